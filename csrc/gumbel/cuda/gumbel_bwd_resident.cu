// CUDA fused Gumbel-softmax backward that reads its inputs once, for a soft forward (the sample y
// saved) of logits in the cluster layout of gumbel_cluster.h (strided softmax dimension, at most
// 16384 long; 8192 with the KL term):
//   grad_v = y_v (dy_v - sum_u y_u dy_u) / tau
//          + gkl p_v (log p_v - sum_u p_u log p_u)      (when grad_kl is given; p = softmax(x))
// The two-sweep kernel (gumbel_bwd.cu) reads y and dy (and x) twice: once for the sums, once for
// the gradient. Here a thread keeps its y in registers and its dy (and x) in shared memory, the
// cluster combines each position's sum y dy (and the KL statistics of x), and the gradient is
// written from the cache.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../gumbel_params.h"
#include "gumbel_cluster.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace gumbel_detail;
using namespace gumbel_cluster;

struct Part {
  float dot;  // sum y dy
  Kl kl;
};

#if DF_GUMBEL_CLUSTERS
struct PartMerge {
  __device__ __forceinline__ Part operator()(const Part& a, const Part& b) const {
    return {__fadd_rn(a.dot, b.dot), kl_merge(a.kl, b.kl)};
  }
};
#endif

// Quads per thread: y of 16 in registers and dy in shared memory (128 KB per block), or with the
// KL term 8, dy and x in shared memory (128 KB too). V = 8192 takes clusters of 8, or 16.
template <bool kKl>
constexpr int quads() {
  return kKl ? 8 : 16;
}

// Shared memory of the cache: [quads][kThreads] float4 of dy, then (kKl) the same of x; thread
// t's quad i at i * kThreads + t, so a warp's accesses are consecutive 16-byte words.
template <bool kKl>
constexpr size_t cache_bytes() {
  return size_t(kKl ? 2 : 1) * quads<kKl>() * kThreads * sizeof(float4);
}

#if DF_GUMBEL_CLUSTERS
// Loads the thread's quads of one tile: y into ys, dy (and x) into the shared cache; returns its
// part of sum y dy (and the KL statistics of x). kFull: a full tile of a whole block
// (gumbel_cluster.h), walked with Cursors and no checks.
template <bool kFull, bool kKl, class T>
__device__ __forceinline__ Part gather(const GumbelParams& p, const Place& place, const TilePos& tp,
                                       float (&ys)[quads<kKl>()][4], float4* dy_cache, float4* x_cache) {
  constexpr int kQuads = quads<kKl>();
  const int t = static_cast<int>(threadIdx.x);
  Part part{0.0f, kl_identity()};
  if constexpr (kFull) {
    const Place pl = place.fresh();
    Cursor<const T> y_at(static_cast<const T*>(p.y_soft), pl, tp, p.inner);
    Cursor<const T> dy_at(static_cast<const T*>(p.grad_y), pl, tp, p.inner);
    Cursor<const T> x_at(static_cast<const T*>(p.logits), pl, tp, p.inner);
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      float dy[4], x[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        ys[i][k] = to_float(*y_at.next(k));
        dy[k] = to_float(*dy_at.next(k));
        if constexpr (kKl) x[k] = to_float(*x_at.next(k));
      }
      dy_cache[i * kThreads + t] = make_float4(dy[0], dy[1], dy[2], dy[3]);
      if constexpr (kKl) x_cache[i * kThreads + t] = make_float4(x[0], x[1], x[2], x[3]);
#pragma unroll
      for (int k = 0; k < 4; ++k) part.dot += ys[i][k] * dy[k];
      if constexpr (kKl) kl_add_quad(part.kl, x);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = place.fresh();
      const int n = ql.count(i, tp.valid, p.vocab);
      const int64_t at = tp.base + 4 * ql.quad(i) * p.inner;
      float dy[4];
      load4<false>(static_cast<const T*>(p.y_soft) + at, p.inner, n, ys[i]);
      load4<false>(static_cast<const T*>(p.grad_y) + at, p.inner, n, dy);
      dy_cache[i * kThreads + t] = make_float4(dy[0], dy[1], dy[2], dy[3]);
      if constexpr (kKl) {
        float x[4];
        load4<false>(static_cast<const T*>(p.logits) + at, p.inner, n, x);
        x_cache[i * kThreads + t] = make_float4(x[0], x[1], x[2], x[3]);
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (k < n) kl_add(part.kl, x[k]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (k < n) part.dot += ys[i][k] * dy[k];
    }
  }
  return part;
}

// The gradient of quad i of the thread's entries, from ys and the cache; dot is the position's
// sum y dy.
template <bool kKl>
__device__ __forceinline__ void quad_grad(int i, float inv_tau, float dot, const KlGrad& klg,
                                          const float (&ys)[quads<kKl>()][4], const float4* dy_cache,
                                          const float4* x_cache, float (&out)[4]) {
  const int t = static_cast<int>(threadIdx.x);
  const float4 d4 = dy_cache[i * kThreads + t];
  const float dy[4] = {d4.x, d4.y, d4.z, d4.w};
  float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (kKl) {
    const float4 x4 = x_cache[i * kThreads + t];
    x[0] = x4.x, x[1] = x4.y, x[2] = x4.z, x[3] = x4.w;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = ys[i][k] * (dy[k] - dot) * inv_tau;
    if constexpr (kKl) out[k] += klg.at(x[k]);
  }
}
#endif

template <class T, bool kKl>
__global__ void __launch_bounds__(kThreads, 1)
    resident_backward_kernel(const GumbelParams p, int64_t quads_per_block, float inv_tau) {
#if defined(__CUDA_ARCH__) && DF_GUMBEL_CLUSTERS
  extern __shared__ float4 cache[];
  __shared__ Exchange<Part> ex;
  constexpr int kQuads = quads<kKl>();
  float4* const dy_cache = cache;
  float4* const x_cache = cache + kQuads * kThreads;  // kKl only
  cg::cluster_group cluster = cg::this_cluster();
  const Place pl = place(cluster, p, quads_per_block);
  const bool whole = whole_block(pl, quads_per_block, kQuads, p.vocab);

  int parity = 0;
  for (int64_t tile = pl.cluster_id; tile < pl.tiles; tile += pl.clusters, parity ^= 1) {
    const TilePos tp = pl.at(tile, p);
    const bool full = whole && full_tile(tile, p);

    float ys[kQuads][4];
    const Part part = full ? gather<true, kKl, T>(p, pl, tp, ys, dy_cache, x_cache)
                           : gather<false, kKl, T>(p, pl, tp, ys, dy_cache, x_cache);
    const Part tot = combine(ex, part, pl, parity, cluster, PartMerge{});

    if (tp.valid) {
      KlGrad klg;
      if constexpr (kKl) klg = KlGrad(tot.kl, to_float(static_cast<const T*>(p.grad_kl)[tp.pos]));
      const auto values = [&](int i, float(&out)[4]) {
        quad_grad<kKl>(i, inv_tau, tot.dot, klg, ys, dy_cache, x_cache, out);
      };
      T* grad = static_cast<T*>(p.grad_logits);
      if (full) {
        write_tile<true, kQuads>(grad, p, pl, tp, values);
      } else {
        write_tile<false, kQuads>(grad, p, pl, tp, values);
      }
    }
  }
  cluster.sync();  // no block may leave while another still reads its block_part
#elif defined(__CUDA_ARCH__)
  __trap();  // device code built without clusters (plan() refuses it): fail, never return unfilled buffers
#endif
}

template <class T, bool kKl>
bool launch_kl(const GumbelParams& p, cudaStream_t stream, const char** err) {
  Plan c;
  if (!fits(p, quads<kKl>())) return false;
  if (!plan<resident_backward_kernel<T, kKl>>(p, quads<kKl>(), cache_bytes<kKl>(), &c)) return refuse(err);
  *err = launch<resident_backward_kernel<T, kKl>>(p, c, stream);
  return true;
}

template <class T>
bool launch_as(const GumbelParams& p, cudaStream_t stream, const char** err) {
  return p.grad_kl != nullptr ? launch_kl<T, true>(p, stream, err) : launch_kl<T, false>(p, stream, err);
}

}  // namespace

bool gumbel_backward_resident(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream, const char** err) {
  *err = nullptr;
  if (!enabled() || p.y_soft == nullptr) return false;
  switch (dtype) {
    case GumbelDType::Float32:
      return launch_as<float>(p, stream, err);
    case GumbelDType::Float16:
      return launch_as<__half>(p, stream, err);
    case GumbelDType::BFloat16:
      return launch_as<__nv_bfloat16>(p, stream, err);
  }
  return false;
}

}  // namespace dalle_fast::cuda
