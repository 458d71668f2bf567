// CUDA fused Gumbel-softmax forward that reads the logits once: the soft sample (with or without
// the KL term) of logits whose softmax dimension is strided (inner > 1, the dVAE's NCHW case) and
// at most 16384 long (8192 in clusters of 8), in the cluster layout of gumbel_cluster.h.
//
// The two-sweep kernel (gumbel_fwd.cu) reads every logit and draws every noise value twice; on the
// H100 it is bound by the instructions of the noise (bf16 took as long as fp32). Here each thread
// issues the loads of all its quads, draws their noise while the loads are in flight, keeps
// u = x + g in registers, then e = exp((u - m_thread) / tau) (the max taken before scaling, so
// that no finite logit overflows); after the cluster has combined each position's (max, sum), it
// writes y = e * exp((m_thread - max) / tau) / sum from the registers. Noise,
// KL statistics and outputs follow gumbel_cuda.h's definitions, so the result equals the
// two-sweep kernel's up to the rounding of exp.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../../philox.h"
#include "../gumbel_params.h"
#include "gumbel_cluster.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace gumbel_detail;
using namespace gumbel_cluster;

struct Part {
  Soft soft;
  Kl kl;
};

#if DF_GUMBEL_CLUSTERS
struct PartMerge {
  float f;  // 1 / tau
  __device__ __forceinline__ Part operator()(const Part& a, const Part& b) const {
    return {soft_merge(a.soft, b.soft, f), kl_merge(a.kl, b.kl)};
  }
};
#endif

constexpr int kQuads = 16;  // quads per thread, in registers: 64 floats

#if DF_GUMBEL_CLUSTERS
// Loads the thread's quads of one tile into u, draws their noise and keeps u = x + g (-inf past
// the vocabulary and the positions); adds x to kl; returns the thread's max of u.
// kFull: a full tile of a whole block (gumbel_cluster.h's whole_block, full_tile), walked with a
// Cursor and no checks.
template <bool kFull, bool kKl, class T>
__device__ __forceinline__ float draw(const GumbelParams& p, const Place& place, const TilePos& tp, const SeedOffset& so,
                                      float (&u)[kQuads][4], Kl& kl) {
  float m = neg_inf();
  if constexpr (kFull) {
    const Place pl = place.fresh();
    Cursor<const T> src(static_cast<const T*>(p.logits), pl, tp, p.inner);
    // Every load first, so that the noise below is drawn while they are in flight.
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) u[i][k] = to_float(*src.next(k));
    }
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      if constexpr (kKl) kl_add_quad(kl, u[i]);
      float g[4];
      gumbel4(so.seed, so.offset, tp.pos, pl.quad(i), g);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        u[i][k] = __fadd_rn(u[i][k], g[k]);
        m = fmaxf(m, u[i][k]);
      }
    }
  } else {
    const T* logits = static_cast<const T*>(p.logits);
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = place.fresh();
      load4<false>(logits + tp.base + 4 * ql.quad(i) * p.inner, p.inner, ql.count(i, tp.valid, p.vocab), u[i]);
    }
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = place.fresh();
      const int n = ql.count(i, tp.valid, p.vocab);
      if (n > 0) {
        float g[4];
        gumbel4(so.seed, so.offset, tp.pos, ql.quad(i), g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < n) {
            if constexpr (kKl) kl_add(kl, u[i][k]);
            u[i][k] = __fadd_rn(u[i][k], g[k]);
            m = fmaxf(m, u[i][k]);
          } else {
            u[i][k] = neg_inf();
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) u[i][k] = neg_inf();
      }
    }
  }
  return m;
}

#endif

template <class T, bool kKl>
__global__ void __launch_bounds__(kThreads, 1)
    resident_kernel(const GumbelParams p, int64_t quads_per_block, float inv_tau) {
#if defined(__CUDA_ARCH__) && DF_GUMBEL_CLUSTERS
  __shared__ Exchange<Part> ex;
  cg::cluster_group cluster = cg::this_cluster();
  const SeedOffset so = take_seed_offset(p);
  const int64_t V = p.vocab;
  const Place pl = place(cluster, p, quads_per_block);
  const bool whole = whole_block(pl, quads_per_block, kQuads, V);

  int parity = 0;
  for (int64_t tile = pl.cluster_id; tile < pl.tiles; tile += pl.clusters, parity ^= 1) {
    const TilePos tp = pl.at(tile, p);
    const bool full = whole && full_tile(tile, p);

    float u[kQuads][4];
    Part part{soft_identity(), kl_identity()};
    const float m = full ? draw<true, kKl, T>(p, pl, tp, so, u, part.kl)
                         : draw<false, kKl, T>(p, pl, tp, so, u, part.kl);
    // e = exp((u - m) / tau) = 2^((u - m) log2(e) / tau) in place: 2^-inf is 0, so -inf entries
    // (and differences past -FLT_MAX) give 0 without a check; a thread with no finite u subtracts
    // 0 instead of m = -inf.
    const float m_sub = m == neg_inf() ? 0.0f : m;
    const float log2e_tau = kLog2E * inv_tau;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        u[i][k] = exp2_ftz((u[i][k] - m_sub) * log2e_tau);
        s += u[i][k];
      }
    }
    part.soft = {m, s, 0.0f};
    const Part tot = combine(ex, part, pl, parity, cluster, PartMerge{inv_tau});

    if (tp.valid) {
      if (kKl && pl.rank == 0 && pl.warp == 0) {
        static_cast<T*>(p.kl)[tp.pos] = from_float<T>(kl_to_uniform(tot.kl, V));
      }
      // s == 0 only where every logit of the position is -inf: y = 0 there, as in gumbel_fwd.cu; s
      // is NaN where one is NaN, and f = s makes the position NaN throughout (-inf entries too).
      const float f = !(tot.soft.s > 0.0f) ? tot.soft.s
                      : m != neg_inf()     ? expf((m - tot.soft.m) * inv_tau) / tot.soft.s
                                           : 0.0f;
      // y = e * f from the cached e.
      const auto values = [&](int i, float(&out)[4]) {
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = u[i][k] * f;
      };
      if (full) {
        write_tile<true, kQuads>(static_cast<T*>(p.y), p, pl, tp, values);
      } else {
        write_tile<false, kQuads>(static_cast<T*>(p.y), p, pl, tp, values);
      }
    }
  }
  cluster.sync();  // no block may leave while another still reads its block_part
#elif defined(__CUDA_ARCH__)
  __trap();  // device code built without clusters (plan() refuses it): fail, never return unfilled buffers
#endif
}

template <class T, bool kKl>
bool launch_as(const GumbelParams& p, cudaStream_t stream, const char** err) {
  Plan c;
  if (!plan<resident_kernel<T, kKl>>(p, kQuads, 0, &c)) return refuse(err);
  *err = launch<resident_kernel<T, kKl>>(p, c, stream);
  return true;
}

}  // namespace

bool gumbel_forward_resident(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream, const char** err) {
  *err = nullptr;
  if (!enabled() || p.hard || !fits(p, kQuads)) return false;
  switch (dtype) {
    case GumbelDType::Float32:
      return p.with_kl ? launch_as<float, true>(p, stream, err) : launch_as<float, false>(p, stream, err);
    case GumbelDType::Float16:
      return p.with_kl ? launch_as<__half, true>(p, stream, err) : launch_as<__half, false>(p, stream, err);
    case GumbelDType::BFloat16:
      return p.with_kl ? launch_as<__nv_bfloat16, true>(p, stream, err)
                       : launch_as<__nv_bfloat16, false>(p, stream, err);
  }
  return false;
}

}  // namespace dalle_fast::cuda
