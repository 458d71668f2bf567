// Plain parameters of the fused Gumbel-softmax kernels (CPU and CUDA): the logits are viewed as a
// contiguous [outer, vocab, inner] tensor, the softmax runs over vocab, and a position is
// (o, i) with flat index o * inner + i. No torch types.
#pragma once

#include <cstdint>

namespace dalle_fast {

// Where the Philox seed and offset come from. On CUDA during graph capture they live in device
// memory (the generator's captured state): *seed_ptr and *offset_ptr + offset_extra.
struct PhiloxSource {
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_extra = 0;
};

struct GumbelParams {
  int64_t outer = 0, vocab = 0, inner = 0;
  float tau = 1.0f;
  bool hard = false;     // forward writes the one-hot of the argmax
  bool with_kl = false;  // forward also writes KL(softmax(logits) || uniform) per position
  // Gumbel-max draw (gumbel_argmax): the forward writes index, the first argmax of
  // z = logits * scale + g over vocab per position, and no y (hard is set, tau unused).
  int64_t* index = nullptr;  // [outer, inner]
  float scale = 1.0f;

  const void* logits = nullptr;  // [outer, vocab, inner]
  void* y = nullptr;             // [outer, vocab, inner], logits' dtype (null with index)
  void* kl = nullptr;            // [outer, inner], logits' dtype (with_kl)
  PhiloxSource rng;
  int64_t* rng_state = nullptr;  // [2]: the (seed, offset) used, written by the forward (CUDA: on device)

  // backward
  const void* grad_y = nullptr;       // [outer, vocab, inner]
  const void* grad_kl = nullptr;      // [outer, inner] or null
  const void* y_soft = nullptr;       // the soft sample when the forward was soft, else null (recomputed)
  const int64_t* rng_in = nullptr;    // [2]: the forward's (seed, offset), host pointer on CPU
  void* grad_logits = nullptr;        // [outer, vocab, inner]
};

}  // namespace dalle_fast
