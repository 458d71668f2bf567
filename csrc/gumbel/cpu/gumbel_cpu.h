// CPU kernels of the fused Gumbel-softmax: blocks of 16 positions, the vocabulary walked with
// the positions as vector lanes, the block's values held in a (vocab x 16) float buffer.
#pragma once

#include <cstdint>

#include "../gumbel_params.h"

namespace dalle_fast::cpu {

enum class GumbelStorage { F32, BF16, F16 };

// Fills p.y (and p.kl), or p.index when set, using the noise of (seed, offset).
void gumbel_forward(const GumbelParams& p, GumbelStorage s, uint64_t seed, uint64_t offset);
// Fills p.grad_logits.
void gumbel_backward(const GumbelParams& p, GumbelStorage s, uint64_t seed, uint64_t offset);
// Writes the float32 noise of (seed, offset) for every element of the [outer, vocab, inner] view.
void gumbel_noise(const GumbelParams& p, uint64_t seed, uint64_t offset, float* out);

}  // namespace dalle_fast::cpu
