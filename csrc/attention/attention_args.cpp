#include "attention_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace dalle_fast {

MaskKind parse_kind(const std::string& kind) {
  if (kind == "row") return MaskKind::Row;
  if (kind == "column") return MaskKind::Column;
  if (kind == "conv") return MaskKind::Conv;
  if (kind == "causal") return MaskKind::Causal;
  TORCH_CHECK_VALUE(false, "unknown attention kind '", kind, "'; expected row, column, conv or causal");
}

MaskSpec make_mask_spec(const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel) {
  TORCH_CHECK_VALUE(text_len >= 1, "text_len must be >= 1, got ", text_len);
  TORCH_CHECK_VALUE(grid >= 1, "grid must be >= 1, got ", grid);
  // MaskSpec::seq_len() is text_len + grid * grid in int64: refuse what would overflow it.
  TORCH_CHECK_VALUE(grid <= (std::numeric_limits<int64_t>::max() - text_len) / grid, "text_len + grid**2 = ",
                    text_len, " + ", grid, "**2 does not fit in int64");
  TORCH_CHECK_VALUE(kernel >= 1 && kernel % 2 == 1, "kernel must be a positive odd int, got ", kernel);
  // From half = grid on, conv allows every earlier image key (causal): clamping leaves the mask as it
  // is and keeps grid * a + half, and the offsets g -+ S * a -+ half, far from int64's limits (a kernel
  // near 2**63 gave wrong attention).
  return MaskSpec{parse_kind(kind), text_len, grid, std::min(kernel / 2, grid)};
}

static void check_one(const at::Tensor& t, const char* name, const MaskSpec& mask, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must have shape [B, H, N, D], got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(2) == mask.seq_len(), op, ": ", name, " has N = ", t.size(2),
                    " but text_len + grid**2 = ", mask.text_len, " + ", mask.grid, "**2 = ", mask.seq_len());
  TORCH_CHECK_VALUE(t.size(3) >= 1, op, ": ", name, " has head dim 0");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> check_qkv(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const MaskSpec& mask,
                                                         const char* op) {
  check_one(q, "q", mask, op);
  check_one(k, "k", mask, op);
  check_one(v, "v", mask, op);
  TORCH_CHECK_VALUE(q.sizes() == k.sizes() && q.sizes() == v.sizes(), op,
                    ": q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                    ": q, k, v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(), op,
                    ": q, k, v must be on the same device, got ", q.device(), ", ", k.device(), ", ", v.device());
  auto last_contig = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  return {last_contig(q), last_contig(k), last_contig(v)};
}

BHND as_bhnd(const at::Tensor& t) {
  BHND r;
  r.ptr = const_cast<void*>(t.data_ptr());
  r.sb = t.stride(0);
  r.sh = t.stride(1);
  r.sn = t.stride(2);
  return r;
}

BHN as_bhn(const at::Tensor& t) {
  BHN r;
  r.ptr = const_cast<void*>(t.data_ptr());
  r.heads = t.size(1);
  r.seq = t.size(2);
  return r;
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const MaskSpec& mask, double scale) {
  // Called directly (torch.ops.dalle_fast.*), the op gets no Python-side check.
  TORCH_CHECK_VALUE(std::isfinite(scale), "sparse_attention: scale must be finite, got ", scale);
  AttnParams p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seq = q.size(2);
  p.dim = q.size(3);
  p.scale = scale;
  p.mask = mask;
  p.q = as_bhnd(q);
  p.k = as_bhnd(k);
  p.v = as_bhnd(v);
  return p;
}

at::ScalarType accum_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

ForwardCall prepare_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel, double scale) {
  const MaskSpec mask = make_mask_spec(kind, text_len, grid, kernel);
  ForwardCall c;
  std::tie(c.q, c.k, c.v) = check_qkv(q_in, k_in, v_in, mask, "sparse_attention");
  c.out = at::empty(c.q.sizes(), c.q.options().memory_format(at::MemoryFormat::Contiguous));
  c.lse = at::empty({c.q.size(0), c.q.size(1), c.q.size(2)}, c.q.options().dtype(accum_dtype(c.q.scalar_type())));
  c.params = make_params(c.q, c.k, c.v, mask, scale);
  c.params.out = as_bhnd(c.out);
  c.params.lse = as_bhn(c.lse);
  return c;
}

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
                              const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse,
                              const std::string& kind, int64_t text_len, int64_t grid, int64_t kernel,
                              double scale) {
  const char* op = "sparse_attention backward";
  const MaskSpec mask = make_mask_spec(kind, text_len, grid, kernel);
  BackwardCall c;
  std::tie(c.q, c.k, c.v) = check_qkv(q_in, k_in, v_in, mask, op);
  const auto& q = c.q;
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ",
                    out.sizes());
  const auto acc = accum_dtype(q.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2) && lse.scalar_type() == acc,
                    op, ": lse must be [B, H, N] of ", acc, ", got ", lse.sizes(), " of ", lse.scalar_type());
  for (const auto* t : {&grad_out, &out, &lse})
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": grad_out, out and lse must be on ", q.device(),
                      " like q, got ", t->device());
  // The kernels read grad_out and out as q's dtype, contiguous.
  c.grad_out = grad_out.to(q.scalar_type()).contiguous();
  c.out = out.to(q.scalar_type()).contiguous();
  c.lse = lse.contiguous();
  c.dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  c.dk = at::empty_like(c.dq);
  c.dv = at::empty_like(c.dq);
  c.delta = at::empty_like(c.lse);
  c.params = make_params(c.q, c.k, c.v, mask, scale);
  c.params.out = as_bhnd(c.out);
  c.params.lse = as_bhn(c.lse);
  c.params.dout = as_bhnd(c.grad_out);
  c.params.dq = as_bhnd(c.dq);
  c.params.dk = as_bhnd(c.dk);
  c.params.dv = as_bhnd(c.dv);
  c.params.delta = as_bhn(c.delta);
  return c;
}

}  // namespace dalle_fast
