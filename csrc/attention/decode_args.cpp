#include "decode_args.h"

#include <cmath>
#include <cstdint>
#include <utility>

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "attention_args.h"

namespace dalle_fast {

namespace {

// Whether the bytes from a's first element to its last meet b's (dalle_fast/ops/decode.py's
// _check_apart tests the same for the index_copy_ path). at::get_overlap_status answers TooHard
// for tensors that are not dense (a strided view of a cache row), so it cannot tell those apart;
// this refuses some that share no element (interleaved caches) but passes views of one buffer
// that do not interleave (the sampler's keys and values, caches cut short along N).
bool spans_meet(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // PyTorch strides are not negative
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair{begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

}  // namespace

DecodeCall prepare_decode(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                          const at::Tensor& offsets, const at::Tensor& g, int64_t text_len, double scale) {
  const char* op = "sparse_decode";
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK_VALUE(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(), op,
                    ": the caches must be [B, H, N, D] of one shape, got ", cache_k.sizes(), " and ", cache_v.sizes());
  TORCH_CHECK_VALUE(cache_k.size(0) == q.size(0) && cache_k.size(1) == q.size(1) && cache_k.size(3) == q.size(2),
                    op, ": q ", q.sizes(), " does not match the caches ", cache_k.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(), op,
                   ": q and the caches must share one dtype, got ", q.scalar_type(), ", ", cache_k.scalar_type(),
                   ", ", cache_v.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong && offsets.dim() == 1, op,
                   ": offsets must be a 1-D int64 tensor, got ", offsets.sizes(), " ", offsets.scalar_type());
  TORCH_CHECK_TYPE(g.scalar_type() == at::kLong && g.dim() == 0, op, ": g must be a 0-dim int64 tensor");
  for (const auto* t : {&cache_k, &cache_v, &offsets, &g})
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": all inputs must be on ", q.device(), ", got ", t->device());
  TORCH_CHECK_VALUE(text_len >= 1 && text_len <= cache_k.size(2), op, ": text_len must be in [1, N = ",
                    cache_k.size(2), "], got ", text_len);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  DecodeCall c;
  c.q = q.stride(2) == 1 ? q : q.contiguous();
  c.k = cache_k.stride(3) == 1 ? cache_k : cache_k.contiguous();
  c.v = cache_v.stride(3) == 1 ? cache_v : cache_v.contiguous();
  c.offsets = offsets.contiguous();
  c.g = g;
  c.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  DecodeParams& p = c.params;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.dim = q.size(2);
  p.seq = cache_k.size(2);
  p.text_len = text_len;
  p.num_offsets = offsets.size(0);
  p.scale = scale;
  p.q = c.q.data_ptr();
  p.q_sb = c.q.stride(0);
  p.q_sh = c.q.stride(1);
  p.k = as_bhnd(c.k);
  p.v = as_bhnd(c.v);
  p.offsets = c.offsets.data_ptr<int64_t>();
  p.g = c.g.data_ptr<int64_t>();
  p.out = c.out.data_ptr();
  return c;
}

DecodeCall prepare_decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& offsets,
                                 const at::Tensor& g, int64_t text_len, double scale) {
  const char* op = "sparse_decode_append";
  TORCH_CHECK_VALUE(k_new.sizes() == q.sizes() && v_new.sizes() == q.sizes(), op, ": k_new and v_new must have q's shape ",
                    q.sizes(), ", got ", k_new.sizes(), " and ", v_new.sizes());
  TORCH_CHECK_TYPE(k_new.scalar_type() == q.scalar_type() && v_new.scalar_type() == q.scalar_type(), op,
                   ": k_new and v_new must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k_new.device() == q.device() && v_new.device() == q.device(), op, ": k_new and v_new must be on ",
                    q.device());
  TORCH_CHECK_VALUE(cache_k.dim() == 4 && cache_v.dim() == 4 && cache_k.stride(3) == 1 && cache_v.stride(3) == 1,
                    op, ": the caches are written in place: their last dim must be contiguous");
  // Written in place, so no two of their elements may share memory (an expand()ed cache would
  // take every batch's row in one place, the last write winning), nor may they share memory with
  // each other or with this step's key and value, which are read while the caches are written.
  for (const auto* t : {&cache_k, &cache_v})
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op,
                      ": the caches are written in place, but one has elements sharing memory (sizes ",
                      t->sizes(), ", strides ", t->strides(), ", e.g. from expand()); pass a clone()");
  const auto check_apart = [op](const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
    TORCH_CHECK_VALUE(!spans_meet(a, b), op, ": ", a_name, " and ", b_name,
                      " share memory (their spans from first to last element meet), but the caches are ",
                      "written in place; give each its own memory (clone() k_new / v_new; allocate the caches ",
                      "apart, not interleaved)");
  };
  check_apart(cache_k, "cache_k", cache_v, "cache_v");
  for (const auto& [cache, cache_name] : {std::pair{&cache_k, "cache_k"}, std::pair{&cache_v, "cache_v"}}) {
    check_apart(*cache, cache_name, k_new, "k_new");
    check_apart(*cache, cache_name, v_new, "v_new");
  }
  DecodeCall c = prepare_decode(q, cache_k, cache_v, offsets, g, text_len, scale);
  c.k_new = k_new.stride(2) == 1 ? k_new : k_new.contiguous();
  c.v_new = v_new.stride(2) == 1 ? v_new : v_new.contiguous();
  DecodeParams& p = c.params;
  p.k_new = {c.k_new.data_ptr(), c.k_new.stride(0), c.k_new.stride(1), 0};
  p.v_new = {c.v_new.data_ptr(), c.v_new.stride(0), c.v_new.stride(1), 0};
  return c;
}

}  // namespace dalle_fast
