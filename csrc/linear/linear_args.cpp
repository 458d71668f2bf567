#include "linear_args.h"

#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace dalle_fast {

namespace {

bool aligned(const at::Tensor& t, int64_t row_align) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(row_align * t.element_size()) == 0;
}

// t itself when it starts aligned and its rows are contiguous and a multiple of row_align apart
// (x, whose row stride the kernels take) or packed (the weight and the norm's vectors, which they
// read without a stride), else a contiguous copy (a fresh allocation: aligned).
at::Tensor readable(const at::Tensor& t, bool strided_rows, int64_t row_align) {
  const bool rows = strided_rows ? t.stride(-1) == 1 && t.stride(0) % row_align == 0 : t.is_contiguous();
  return rows && aligned(t, row_align) ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

LinearCall prepare_linear(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, int64_t activation,
                          const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                          double ln_eps, int64_t row_align) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x_in.dim() == 2 && weight_in.dim() == 2 && x_in.size(1) == weight_in.size(1), op,
                    ": x must be [M, K] and weight [N, K], got ", x_in.sizes(), " and ", weight_in.sizes());
  TORCH_CHECK_VALUE(weight_in.device() == x_in.device(), op, ": weight must be on x's device");
  TORCH_CHECK_TYPE(x_in.scalar_type() == weight_in.scalar_type(), op, ": x and weight must have one dtype, got ",
                   x_in.scalar_type(), " and ", weight_in.scalar_type());
  TORCH_CHECK_VALUE(activation == 0 || activation == 1, op, ": activation must be 0 (none) or 1 (gelu), got ",
                    activation);
  LinearCall c;
  c.x = readable(x_in, true, row_align);
  c.weight = readable(weight_in, false, row_align);
  LinearParams& p = c.params;
  p.m = c.x.size(0);
  p.k = c.x.size(1);
  p.n = c.weight.size(0);
  p.x = c.x.data_ptr();
  p.x_stride = c.x.stride(0);
  p.w = c.weight.data_ptr();
  p.activation = static_cast<Activation>(activation);
  const auto dtype = c.x.scalar_type();
  if (bias.has_value()) {
    c.bias = bias->contiguous();
    TORCH_CHECK_VALUE(c.bias.dim() == 1 && c.bias.size(0) == p.n && c.bias.scalar_type() == dtype &&
                          c.bias.device() == c.x.device(),
                      op, ": bias must be [N] of x's dtype and device, got ", c.bias.sizes(), " ",
                      c.bias.scalar_type());
    p.bias = c.bias.data_ptr();
  }
  if (residual.has_value()) {
    // stride(-1) only of a tensor that has a dimension (a 0-dim residual gets the message below)
    c.residual = residual->dim() >= 1 && residual->stride(-1) == 1 ? *residual : residual->contiguous();
    TORCH_CHECK_VALUE(c.residual.dim() == 2 && c.residual.size(0) == p.m && c.residual.size(1) == p.n &&
                          c.residual.scalar_type() == dtype && c.residual.device() == c.x.device(),
                      op, ": residual must be [M, N] of x's dtype and device, got ", c.residual.sizes(), " ",
                      c.residual.scalar_type());
    p.residual = c.residual.data_ptr();
    p.res_stride = c.residual.stride(0);
  }
  TORCH_CHECK_VALUE(ln_weight.has_value() == ln_bias.has_value(), op,
                    ": give both ln_weight and ln_bias (a layer norm with its affine part) or neither");
  if (ln_weight.has_value()) {
    for (const auto* t : {&*ln_weight, &*ln_bias}) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == p.k && t->scalar_type() == dtype && t->device() == c.x.device(),
                        op, ": ln_weight and ln_bias must be [K] of x's dtype and device, got ", t->sizes(), " ",
                        t->scalar_type());
    }
    TORCH_CHECK_VALUE(ln_eps > 0, op, ": ln_eps must be positive, got ", ln_eps);
    c.ln_weight = readable(*ln_weight, false, row_align);
    c.ln_bias = readable(*ln_bias, false, row_align);
    p.ln_weight = c.ln_weight.data_ptr();
    p.ln_bias = c.ln_bias.data_ptr();
    p.ln_eps = static_cast<float>(ln_eps);
  }
  c.out = at::empty({p.m, p.n}, c.x.options());
  p.out = c.out.data_ptr();
  return c;
}

}  // namespace dalle_fast
