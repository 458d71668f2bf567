// TORCH_LIBRARY_IMPL(dalle_fast, CPU): validated params (attention_args.h) to the CPU kernels.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../attention_args.h"
#include "attention_cpu.h"

namespace dalle_fast::cpu {

namespace {

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), "sparse_attention: the CPU kernel needs CPU tensors, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "sparse_attention: the CPU kernel supports float32 and float64, got ", q.scalar_type(),
                   "; cast the inputs or use dalle_fast.ops.backend('reference')");
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           c10::string_view kind, int64_t text_len, int64_t grid, int64_t kernel,
                                           double scale) {
  auto c = prepare_forward(q, k, v, std::string(kind), text_len, grid, kernel, scale);
  check_cpu(c.q);
  if (c.q.numel() > 0) {
    if (c.q.scalar_type() == at::kDouble)
      attention_forward<double>(c.params);
    else
      attention_forward<float>(c.params);
  }
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        c10::string_view kind, int64_t text_len, int64_t grid,
                                                        int64_t kernel, double scale) {
  auto c = prepare_backward(grad_out, q, k, v, out, lse, std::string(kind), text_len, grid, kernel, scale);
  check_cpu(c.q);
  if (c.q.numel() > 0) {
    if (c.q.scalar_type() == at::kDouble)
      attention_backward<double>(c.params);
    else
      attention_backward<float>(c.params);
  }
  return {c.dq, c.dk, c.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &forward);
  m.impl("sparse_attention_bwd", &backward);
}

}  // namespace dalle_fast::cpu
