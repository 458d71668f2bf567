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

constexpr int kKeyBlock = 8;  // keys scored at once (independent chains of multiply-adds)
constexpr int kValueBlock = 4;  // value rows added per pass over the accumulator

// scale * (q . k) for N key rows at once, each summed in sum8's order (8 running sums over the
// whole chunks of D, then the tail, then the 8 sums in order): the bits of one q . k at a time,
// whichever block a key fell in. One at a time was a serial chain of D / 8 multiply-adds and 8
// adds; N side by side overlap their arithmetic and their loads. In a sampling step the rows come
// from beyond L2 (every layer's cache in turn), where a call takes about twice as long as over one
// cache in L2: blocks of 8 keys and 4 value rows took 9% off it on a Sapphire Rapids Xeon (B 8,
// H 4, D 64, 93 keys, 8 caches).
template <int N, class T>
DF_ALWAYS_INLINE void scores(const T* __restrict q, const T* const* k, int64_t D, T scale, T* out) {
  typedef T lanes8 __attribute__((vector_size(8 * sizeof(T))));
  typedef T lanes8_any __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T)), may_alias));
  lanes8 part[N];
  for (int i = 0; i < N; ++i) part[i] = lanes8{};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const lanes8 qv = *reinterpret_cast<const lanes8_any*>(q + d);
    for (int i = 0; i < N; ++i) part[i] += qv * *reinterpret_cast<const lanes8_any*>(k[i] + d);
  }
  for (int i = 0; i < N; ++i) {
    T s = 0;
    for (int64_t t = d; t < D; ++t) s += q[t] * k[i][t];
    for (int l = 0; l < 8; ++l) s += part[i][l];
    out[i] = s * scale;
  }
}

// acc[d] += w[i] * v[i][d] for i < N in that order, each accumulator loaded and stored once a block.
template <int N, class T>
DF_ALWAYS_INLINE void add_values(const T* w, const T* const* v, int64_t D, T* __restrict acc) {
  for (int64_t d = 0; d < D; ++d) {
    T a = acc[d];
    for (int i = 0; i < N; ++i) a += w[i] * v[i][d];
    acc[d] = a;
  }
}

// The output row of one (batch, head) over the step's n keys; prob (n) and acc (D) are scratch.
template <class T>
DF_CPU_CLONES void decode_row(const DecodeParams& p, const int64_t* keys, int64_t n, int64_t bh, T* prob, T* acc) {
  const int64_t D = p.dim, b = bh / p.heads, h = bh % p.heads;
  const T scale = static_cast<T>(p.scale);
  const T* q = p.q_row<T>(b, h);
  const T* rows[kKeyBlock];
  int64_t j = 0;
  for (; j + kKeyBlock <= n; j += kKeyBlock) {
    for (int i = 0; i < kKeyBlock; ++i) rows[i] = p.k.row<const T>(b, h, keys[j + i]);
    scores<kKeyBlock>(q, rows, D, scale, prob + j);
  }
  for (; j < n; ++j) {
    rows[0] = p.k.row<const T>(b, h, keys[j]);
    scores<1>(q, rows, D, scale, prob + j);
  }
  T top = -std::numeric_limits<T>::infinity();
  for (j = 0; j < n; ++j) top = std::max(top, prob[j]);
  T sum = 0;
  for (j = 0; j < n; ++j) sum += (prob[j] = exp_nonpos(prob[j] - top));
  std::fill(acc, acc + D, T(0));
  for (j = 0; j + kValueBlock <= n; j += kValueBlock) {
    for (int i = 0; i < kValueBlock; ++i) rows[i] = p.v.row<const T>(b, h, keys[j + i]);
    add_values<kValueBlock>(prob + j, rows, D, acc);
  }
  for (; j < n; ++j) {
    rows[0] = p.v.row<const T>(b, h, keys[j]);
    add_values<1>(prob + j, rows, D, acc);
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
