// sparse_decode on the CPU: one (batch, head) per work item; the step's key list is the same
// for all of them, so it is built once. Scores, softmax and the value sum in the accumulate
// type (double for double, else float).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../../cpu_math.h"
#include "../decode_args.h"

namespace dalle_fast::cpu {

namespace {

// The output row of one (batch, head) over the step's n keys; prob (n) and acc (D) are scratch.
template <class T>
DF_CPU_CLONES void decode_row(const DecodeParams& p, const int64_t* keys, int64_t n, int64_t bh, T* prob, T* acc) {
  const int64_t D = p.dim, b = bh / p.heads, h = bh % p.heads;
  const T scale = static_cast<T>(p.scale);
  const T* q = p.q_row<T>(b, h);
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const T* __restrict k = p.k.row<const T>(b, h, keys[j]);
    prob[j] = sum8<T>(D, [q, k](int64_t d) { return q[d] * k[d]; }) * scale;  // q . k
    top = std::max(top, prob[j]);
  }
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (prob[j] = exp_nonpos(prob[j] - top));
  std::fill(acc, acc + D, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* __restrict v = p.v.row<const T>(b, h, keys[j]);
    for (int64_t d = 0; d < D; ++d) acc[d] += prob[j] * v[d];
  }
  T* out = static_cast<T*>(p.out) + bh * D;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] / sum;
}

template <class T>
void decode(const DecodeParams& p) {
  const int64_t g = *p.g;
  std::vector<int64_t> keys;
  for (int64_t j = 0; j < p.num_keys(); ++j)
    if (const int64_t key = p.key(j, g); key >= 0) keys.push_back(key);
  const int64_t n = static_cast<int64_t>(keys.size());
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> prob(static_cast<size_t>(n)), acc(static_cast<size_t>(p.dim));
    for (int64_t bh = begin; bh < end; ++bh) decode_row<T>(p, keys.data(), n, bh, prob.data(), acc.data());
  });
}

// Both ops after their argument checks: sparse_decode_append's params carry k_new / v_new,
// which are copied into the caches first (then the caches hold this step).
template <class T>
void append_then_decode(const DecodeParams& p) {
  if (p.writes_row(*p.g))
    for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) p.append<T>(bh / p.heads, bh % p.heads, *p.g, 0, 1);
  if (p.batch * p.heads * p.dim > 0) decode<T>(p);
}

at::Tensor run(const DecodeCall& c, const char* op) {
  TORCH_CHECK_TYPE(c.q.scalar_type() == at::kFloat || c.q.scalar_type() == at::kDouble, op,
                   ": the CPU kernel supports float32 and float64, got ", c.q.scalar_type());
  if (c.q.scalar_type() == at::kDouble)
    append_then_decode<double>(c.params);
  else
    append_then_decode<float>(c.params);
  return c.out;
}

at::Tensor sparse_decode(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                         const at::Tensor& offsets, const at::Tensor& g, int64_t text_len, double scale) {
  return run(prepare_decode(q, cache_k, cache_v, offsets, g, text_len, scale), "sparse_decode");
}

at::Tensor sparse_decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& offsets,
                                const at::Tensor& g, int64_t text_len, double scale) {
  return run(prepare_decode_append(q, k_new, v_new, cache_k, cache_v, offsets, g, text_len, scale),
             "sparse_decode_append");
}

}  // namespace

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_decode", &sparse_decode);
  m.impl("sparse_decode_append", &sparse_decode_append);
}

}  // namespace dalle_fast::cpu
