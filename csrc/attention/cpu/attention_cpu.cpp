// TORCH_LIBRARY_IMPL(dalle_fast, CPU): tensors in, validated params to the CPU kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../attention_args.h"
#include "attention_cpu.h"

namespace dalle_fast::cpu {

namespace {

void check_cpu_dtype(const at::Tensor& q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "sparse_attention: the CPU kernel supports float32 and float64, got ", q.scalar_type(),
                   "; cast the inputs or use dalle_fast.ops.backend('reference')");
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, c10::string_view kind, int64_t text_len,
                                           int64_t grid, int64_t kernel, double scale) {
  const MaskSpec mask = make_mask_spec(std::string(kind), text_len, grid, kernel);
  auto [q, k, v] = check_qkv(q_in, k_in, v_in, mask, "sparse_attention");
  check_cpu_dtype(q);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(accum_dtype(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  AttnParams p = make_params(q, k, v, mask, scale);
  p.out = as_bhnd(out);
  p.lse = as_bhn(lse);
  if (q.scalar_type() == at::kDouble)
    attention_forward<double>(p);
  else
    attention_forward<float>(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                        const at::Tensor& k_in, const at::Tensor& v_in,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        c10::string_view kind, int64_t text_len, int64_t grid,
                                                        int64_t kernel, double scale) {
  const MaskSpec mask = make_mask_spec(std::string(kind), text_len, grid, kernel);
  auto [q, k, v] = check_qkv(q_in, k_in, v_in, mask, "sparse_attention backward");
  check_cpu_dtype(q);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "sparse_attention backward: grad_out and out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2) && lse.scalar_type() == accum_dtype(q.scalar_type()),
                    "sparse_attention backward: lse must be [B, H, N] of ", accum_dtype(q.scalar_type()));
  const auto g = grad_out.to(q.scalar_type()).contiguous();
  const auto o = out.contiguous();
  const auto l = lse.contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty_like(dq);
  auto dv = at::empty_like(dq);
  if (q.numel() == 0) return {dq, dk, dv};
  auto delta = at::empty_like(l);
  AttnParams p = make_params(q, k, v, mask, scale);
  p.out = as_bhnd(o);
  p.lse = as_bhn(l);
  p.dout = as_bhnd(g);
  p.dq = as_bhnd(dq);
  p.dk = as_bhnd(dk);
  p.dv = as_bhnd(dv);
  p.delta = as_bhn(delta);
  if (q.scalar_type() == at::kDouble)
    attention_backward<double>(p);
  else
    attention_backward<float>(p);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention_fwd", &forward);
  m.impl("sparse_attention_bwd", &backward);
}

}  // namespace dalle_fast::cpu
