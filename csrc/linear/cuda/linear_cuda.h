// CUDA launcher of the skinny_linear op: plain LinearParams in, no torch types.
#pragma once

#include <cuda_runtime.h>

#include "../../attention/cuda/attention_cuda.h"  // DType
#include "../linear_params.h"

namespace dalle_fast::cuda {

// The largest m one launch takes (four m16 tiles of the tensor-core multiply).
constexpr int64_t kSkinnyMaxRows = 64;

// Enqueues out = act(ln(x) w^T + bias) + residual on `stream`, for float16 or bfloat16. Needs
// m <= kSkinnyMaxRows, k % 32 == 0, n % 8 == 0 and 16-byte aligned rows of x and w
// (linear_cuda.cpp checks). Returns nullptr or a static launch error message.
const char* skinny_linear(const LinearParams& p, DType dtype, cudaStream_t stream);

}  // namespace dalle_fast::cuda
