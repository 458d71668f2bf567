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

// Everything a device implementation needs for one call: validated inputs, allocated outputs
// and the params pointing at them (the tensors keep the memory alive).
struct ForwardCall {
  at::Tensor q, k, v, out, lse;
  AttnParams params;
};
struct BackwardCall {
  at::Tensor q, k, v, grad_out, out, lse, dq, dk, dv, delta;
  AttnParams params;
};

ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::string& kind,
                            int64_t text_len, int64_t grid, int64_t kernel, double scale);
BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel,
                              double scale);

}  // namespace dalle_fast
