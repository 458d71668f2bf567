// TORCH_LIBRARY_IMPL(dalle_fast, CUDA) of skinny_linear: checks the tensors, fills LinearParams and
// enqueues the kernel on the current stream of x's device. The Python wrapper
// (dalle_fast/ops/linear.py) sends only calls the kernel takes in eager mode; these checks keep a
// direct call of torch.ops.dalle_fast.skinny_linear from reading out of bounds, and a row layout
// the kernel's 16-byte loads cannot read (a view at an odd offset, strided rows: under
// torch.compile the wrapper cannot see the storage) is copied first instead of refused.
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

// t itself when it starts 16-byte aligned and its rows are contiguous and 8 elements (16 bytes)
// apart (x, whose row stride the kernel takes) or packed (the weight and the norm's vectors,
// which it reads without a stride), else a contiguous copy (a fresh allocation: aligned).
at::Tensor readable(const at::Tensor& t, bool strided_rows) {
  const bool rows = strided_rows ? t.stride(-1) == 1 && t.stride(0) % 8 == 0 : t.is_contiguous();
  return rows && aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, int64_t activation,
                  const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                  double ln_eps) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && weight_in.dim() == 2 && x_in.size(1) == weight_in.size(1), op,
                    ": x must be [M, K] and weight [N, K], got ", x_in.sizes(), " and ", weight_in.sizes());
  TORCH_CHECK_VALUE(weight_in.device() == x_in.device(), op, ": weight must be on x's device");
  const c10::cuda::CUDAGuard guard(x_in.device());  // before any copy below
  const at::Tensor x = readable(x_in, true), weight = readable(weight_in, false);
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
  at::Tensor lw, lb;
  if (ln_weight.has_value()) {
    for (const auto* t : {&*ln_weight, &*ln_bias}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == k && t->scalar_type() == x.scalar_type() &&
                            t->device() == x.device(),
                        op, ": ln_weight and ln_bias must be [K] of x's dtype and device, got ", t->sizes(), " ",
                        t->scalar_type());
    }
    TORCH_CHECK_VALUE(ln_eps > 0, op, ": ln_eps must be positive, got ", ln_eps);
    lw = readable(*ln_weight, false);
    lb = readable(*ln_bias, false);
    p.ln_weight = lw.data_ptr();
    p.ln_bias = lb.data_ptr();
    p.ln_eps = static_cast<float>(ln_eps);
  }
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
