// Validation of the op's arguments and their translation into AttnParams: the one place where
// torch tensors meet the kernels' plain structs (shared by the CPU and CUDA implementations).
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "params.h"

namespace dalle_fast {

MaskKind parse_kind(const std::string& kind);
MaskSpec make_mask_spec(const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel);

// Checks q, k, v (and that they agree), returns them with a contiguous last dimension.
std::tuple<at::Tensor, at::Tensor, at::Tensor> check_qkv(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const MaskSpec& mask,
                                                         const char* op);

// Fills everything but the output pointers.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const MaskSpec& mask, double scale);

BHND as_bhnd(const at::Tensor& t);  // t must have a contiguous last dimension
BHN as_bhn(const at::Tensor& t);    // t must be contiguous [B, H, N]

// The statistics dtype for an input dtype: float64 for float64, else float32.
at::ScalarType accum_dtype(at::ScalarType t);

}  // namespace dalle_fast
