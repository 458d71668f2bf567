// Plain parameters of the skinny_linear op (dalle_fast/ops/linear.py): out = act(ln(x) w^T + bias)
// + residual for a few rows of x (a sampling step's batch), ln an optional layer norm. No torch
// types.
#pragma once

#include <cstdint>

namespace dalle_fast {

enum class Activation : int { None = 0, Gelu = 1 };  // Gelu: the exact one, 0.5 x (1 + erf(x / sqrt 2))

struct LinearParams {
  int64_t m = 0, n = 0, k = 0;
  const void* x = nullptr;         // [m, k], rows x_stride elements apart, 16-byte aligned
  int64_t x_stride = 0;
  const void* w = nullptr;         // [n, k] contiguous, 16-byte aligned
  const void* bias = nullptr;      // [n] or null
  const void* residual = nullptr;  // [m, n], rows res_stride elements apart, or null
  int64_t res_stride = 0;
  void* out = nullptr;             // [m, n] contiguous
  Activation activation = Activation::None;
  // When ln_weight is set, x is first layer-normalised over k (as nn.LayerNorm: biased variance,
  // eps inside the square root), scaled by ln_weight and shifted by ln_bias ([k] each, 16-byte
  // aligned), and rounded to x's dtype, as the separate layer would store it.
  const void* ln_weight = nullptr;
  const void* ln_bias = nullptr;
  float ln_eps = 1e-5f;
};

}  // namespace dalle_fast
