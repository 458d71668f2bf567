// CUDA fused Gumbel-softmax forward that reads the logits once: the soft sample (with or without
// the KL term) of logits whose softmax dimension is strided (inner > 1, the dVAE's NCHW case) and
// at most 16384 long (8192 in clusters of 8), in the cluster layout of gumbel_cluster.h.
//
// The two-sweep kernel (gumbel_fwd.cu) reads every logit and draws every noise value twice; on the
// H100 it is bound by the instructions of the noise (bf16 took as long as fp32). Here each thread
// issues the loads of all its quads, draws their noise while the loads are in flight, keeps
// z = (x + g) / tau in registers, then e = exp(z - m_thread); after the cluster has combined each
// position's (max, sum), it writes y = e * exp(m_thread - max) / sum from the registers. Noise,
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
  __device__ __forceinline__ Part operator()(const Part& a, const Part& b) const {
    return {soft_merge(a.soft, b.soft), kl_merge(a.kl, b.kl)};
  }
};
#endif

constexpr int kQuads = 16;  // quads per thread, in registers: 64 floats

template <class T, bool kKl>
__global__ void __launch_bounds__(kThreads, 1)
    resident_kernel(const GumbelParams p, int64_t quads_per_block, float inv_tau) {
#if defined(__CUDA_ARCH__) && DF_GUMBEL_CLUSTERS
  __shared__ Exchange<Part> ex;
  cg::cluster_group cluster = cg::this_cluster();
  const SeedOffset so = take_seed_offset(p);
  const int64_t V = p.vocab, inner = p.inner;
  const Place pl = place(cluster, p, quads_per_block);
  const T* logits = static_cast<const T*>(p.logits);
  T* y = static_cast<T*>(p.y);

  int parity = 0;
  for (int64_t tile = pl.cluster_id; tile < pl.tiles; tile += pl.clusters, parity ^= 1) {
    const auto [pos, valid, base] = pl.at(tile, p);

    // Every load first, so that the noise below is drawn while they are in flight.
    float z[kQuads][4];
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = pl.fresh();
      load4<false>(logits + base + 4 * ql.quad(i) * inner, inner, ql.count(i, valid, V), z[i]);
    }

    Part part{soft_identity(), kl_identity()};
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = pl.fresh();
      const int n = ql.count(i, valid, V);
      if (n > 0) {
        float g[4];
        gumbel4(so.seed, so.offset, pos, ql.quad(i), g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < n) {
            if constexpr (kKl) kl_add(part.kl, z[i][k]);
            z[i][k] = __fmul_rn(__fadd_rn(z[i][k], g[k]), inv_tau);
            m = fmaxf(m, z[i][k]);
          } else {
            z[i][k] = neg_inf();
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) z[i][k] = neg_inf();
      }
    }
    // e = exp(z - m) in place; -inf entries (and a thread with no finite z) give 0.
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float e = z[i][k] == neg_inf() ? 0.0f : __expf(z[i][k] - m);
        z[i][k] = e;
        s += e;
      }
    }
    part.soft = {m, s, 0.0f};
    const Part tot = combine(ex, part, pl, parity, cluster, PartMerge{});

    const int64_t stride = opaque(inner);
    if (valid) {
      if (kKl && pl.rank == 0 && pl.warp == 0) {
        static_cast<T*>(p.kl)[pos] = from_float<T>(kl_to_uniform(tot.kl, V));
      }
      // s == 0 only where every logit of the position is -inf: y = 0 there, as in gumbel_fwd.cu.
      const float f = tot.soft.s > 0.0f && m != neg_inf() ? expf(m - tot.soft.m) / tot.soft.s : 0.0f;
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
        const Place ql = pl.fresh();
        const int n = ql.count(i, valid, V);
        if (n > 0) {
          float out[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = z[i][k] * f;
          store4<false>(y + base + 4 * ql.quad(i) * stride, stride, n, out);
        }
      }
    }
  }
  cluster.sync();  // no block may leave while another still reads its block_part
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
