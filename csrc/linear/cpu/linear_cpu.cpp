// TORCH_LIBRARY_IMPL(dalle_fast, CPU) of skinny_linear: float32 tensors through the shared checks
// (linear_args.h) to the CPU kernel, which applies the GELU too (cpu::gelu, cpu_math.h).
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../linear_args.h"
#include "linear_cpu.h"

namespace dalle_fast::cpu {

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, int64_t activation,
                  const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                  double ln_eps) {
  const char* op = "skinny_linear";
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ", x.device());
  auto c = prepare_linear(x, weight, bias, residual, activation, ln_weight, ln_bias, ln_eps, 1);
  TORCH_CHECK_TYPE(c.x.scalar_type() == at::kFloat, op, ": the CPU kernel takes float32, got ", c.x.scalar_type());
  skinny_linear_f32(c.params);
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) { m.impl("skinny_linear", &linear); }

}  // namespace dalle_fast::cpu
