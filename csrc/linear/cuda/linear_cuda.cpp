// TORCH_LIBRARY_IMPL(dalle_fast, CUDA) of skinny_linear: checks the tensors, fills LinearParams and
// enqueues the kernel on the current stream of x's device. The Python wrapper
// (dalle_fast/ops/linear.py) sends only calls the kernel takes; these checks keep a direct call
// of torch.ops.dalle_fast.skinny_linear from reading out of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../linear_params.h"
#include "linear_cuda.h"

namespace dalle_fast::cuda {

namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, int64_t activation,
                  const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                  double ln_eps) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), op,
                    ": x must be [M, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(m >= 1 && m <= kSkinnyMaxRows && k % 32 == 0 && n % 8 == 0 && n > 0, op,
                    ": the kernel takes 1 <= M <= ", kSkinnyMaxRows, ", K % 32 == 0 and N % 8 == 0, got M=", m,
                    " K=", k, " N=", n);
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type() &&
                       (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
                   op, ": x and weight must both be float16 or both bfloat16, got ", x.scalar_type(), " and ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(activation == 0 || activation == 1, op, ": activation must be 0 (none) or 1 (gelu), got ",
                    activation);
  TORCH_CHECK_VALUE(weight.device() == x.device() && weight.is_contiguous() && aligned16(weight), op,
                    ": weight must be contiguous, 16-byte aligned and on x's device");
  TORCH_CHECK_VALUE(x.stride(1) == 1 && x.stride(0) % 8 == 0 && aligned16(x), op,
                    ": x's rows must be contiguous and 16-byte aligned, got strides ", x.strides());
  LinearParams p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.w = weight.data_ptr();
  p.activation = static_cast<Activation>(activation);
  at::Tensor b, r;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n && b.scalar_type() == x.scalar_type() && b.device() == x.device(),
                      op, ": bias must be [N] of x's dtype and device, got ", b.sizes(), " ", b.scalar_type());
    p.bias = b.data_ptr();
  }
  if (residual.has_value()) {
    r = residual->stride(-1) == 1 ? *residual : residual->contiguous();
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == m && r.size(1) == n && r.scalar_type() == x.scalar_type() &&
                          r.device() == x.device(),
                      op, ": residual must be [M, N] of x's dtype and device, got ", r.sizes(), " ", r.scalar_type());
    p.residual = r.data_ptr();
    p.res_stride = r.stride(0);
  }
  TORCH_CHECK_VALUE(ln_weight.has_value() == ln_bias.has_value(), op,
                    ": give both ln_weight and ln_bias (a layer norm with its affine part) or neither");
  if (ln_weight.has_value()) {
    for (const auto* t : {&*ln_weight, &*ln_bias}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == k && t->scalar_type() == x.scalar_type() &&
                            t->device() == x.device() && t->is_contiguous() && aligned16(*t),
                        op, ": ln_weight and ln_bias must be contiguous, 16-byte aligned [K] of x's dtype and device, "
                        "got ", t->sizes(), " ", t->scalar_type());
    }
    TORCH_CHECK_VALUE(ln_eps > 0, op, ": ln_eps must be positive, got ", ln_eps);
    p.ln_weight = ln_weight->data_ptr();
    p.ln_bias = ln_bias->data_ptr();
    p.ln_eps = static_cast<float>(ln_eps);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({m, n}, x.options());
  p.out = out.data_ptr();
  const DType dtype = x.scalar_type() == at::kHalf ? DType::Float16 : DType::BFloat16;
  const char* err = skinny_linear(p, dtype, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) { m.impl("skinny_linear", &linear); }

}  // namespace dalle_fast::cuda
