// TORCH_LIBRARY_IMPL(dalle_fast, CUDA) of skinny_linear: checks the tensors (linear_args.h) and the
// kernel's own limits, and enqueues the kernel on the current stream of x's device. The Python
// wrapper (dalle_fast/ops/linear.py) sends only calls the kernel takes in eager mode; these checks
// keep a direct call of torch.ops.dalle_fast.skinny_linear from reading out of bounds, and a row
// layout the kernel's 16-byte loads cannot read (a view at an odd offset, strided rows: under
// torch.compile the wrapper cannot see the storage) is copied first instead of refused.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../linear_args.h"
#include "linear_cuda.h"

namespace dalle_fast::cuda {

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, int64_t activation,
                  const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                  double ln_eps) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());  // before any copy prepare_linear makes
  // 8 elements: the kernel's 16-byte loads of 2-byte elements
  auto c = prepare_linear(x, weight, bias, residual, activation, ln_weight, ln_bias, ln_eps, 8);
  const LinearParams& p = c.params;
  TORCH_CHECK_VALUE(p.m >= 1 && p.m <= kSkinnyMaxRows && p.k % 32 == 0 && p.n % 8 == 0 && p.n > 0, op,
                    ": the kernel takes 1 <= M <= ", kSkinnyMaxRows, ", K % 32 == 0 and N % 8 == 0, got M=", p.m,
                    " K=", p.k, " N=", p.n);
  TORCH_CHECK_TYPE(c.x.scalar_type() == at::kHalf || c.x.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernel takes float16 or bfloat16, got ", c.x.scalar_type());
  const DType dtype = c.x.scalar_type() == at::kHalf ? DType::Float16 : DType::BFloat16;
  const char* err = skinny_linear(p, dtype, c10::cuda::getCurrentCUDAStream(c.x.device().index()).stream());
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) { m.impl("skinny_linear", &linear); }

}  // namespace dalle_fast::cuda
