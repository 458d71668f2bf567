// Plain parameters of the skinny_linear op (dalle_fast/ops/linear.py): out = act(x w^T + bias)
// + residual for a few rows of x (a sampling step's batch). No torch types.
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
};

}  // namespace dalle_fast
