// Validation and call preparation for the fused Gumbel-softmax ops, shared by the CPU and CUDA
// implementations: the one place where tensors become GumbelParams.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "gumbel_params.h"

namespace dalle_fast {

struct GumbelForwardCall {
  at::Tensor logits, y, kl, index, rng_state;
  GumbelParams params;
};

struct GumbelBackwardCall {
  at::Tensor grad_y, grad_kl, logits, y, rng_state, grad_logits;
  GumbelParams params;
};

// logits: any floating tensor; softmax over `dim`. The caller fills params.rng (and, on CPU,
// rng_state's values) from its generator.
GumbelForwardCall prepare_gumbel_forward(const at::Tensor& logits, double tau, int64_t dim, bool hard, bool with_kl);

// gumbel_argmax: index (int64, logits' shape without dim) and rng_state; no y. scale > 0, finite.
GumbelForwardCall prepare_gumbel_argmax(const at::Tensor& logits, double scale, int64_t dim);

GumbelBackwardCall prepare_gumbel_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_kl,
                                           const at::Tensor& logits, const at::Tensor& y,
                                           const at::Tensor& rng_state, double tau, int64_t dim, bool hard);

// The [outer, vocab, inner] view of `shape` around `dim` (already wrapped).
void gumbel_view(const at::Tensor& logits, int64_t dim, GumbelParams& p);

}  // namespace dalle_fast
