// CUDA fused Gumbel-softmax forward that reads the logits once: the soft sample (with or without
// the KL term) of logits whose softmax dimension is strided (inner > 1, the dVAE's NCHW case) and
// whose vocabulary fits the registers of one thread-block cluster (kMaxVocab, 8192 entries).
//
// The two-sweep kernel (gumbel_fwd.cu) reads every logit and draws every noise value twice; on the
// H100 it is bound by the instructions of the noise (bf16 took as long as fp32). Here:
//   - a cluster of C blocks (sm_90 thread-block clusters, C <= 16) owns a tile of 32 adjacent
//     positions; block r takes the vocabulary quads [r * Qc, (r + 1) * Qc), warp w of a block the
//     quads w, w + kWarps, ... of those, and lane l position l of the tile, so a warp reads 32
//     adjacent positions of one vocabulary row (coalesced);
//   - each thread issues the loads of all its quads (at most kQuads), draws their noise while the
//     loads are in flight, and keeps z = (x + g) / tau in registers, then e = exp(z - m_thread);
//   - the (max, sum) of each position is combined over the warps in shared memory, then over the
//     cluster's blocks through distributed shared memory, every block in the same rank order, so
//     all threads of a position get the same bits;
//   - y = e * exp(m_thread - max) / sum is written from the registers.
// Noise, KL statistics and the outputs follow gumbel_cuda.h's definitions, so the result equals
// the two-sweep kernel's up to the rounding of exp. DALLE_FAST_GUMBEL_RESIDENT=0 in the
// environment turns this path off (read at every call), to compare or bisect.
//
// Sizes: 512 threads of at most 128 registers, one block per SM; 32 cached floats per thread is
// what fits without spills (64 spilled ~500 bytes), so V = 8192 takes clusters of 16 blocks,
// a size sm_90 allows only as non-portable. Where the device cannot keep clusters on at least
// 3/4 of its SMs (small GPCs), the two-sweep kernel runs instead.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../../philox.h"
#include "../gumbel_params.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace gumbel_detail;
namespace cg = cooperative_groups;

constexpr int kWarps = 16;                 // warps per block
constexpr int kThreads = kWarps * kWarp;   // 512: one block per SM with up to 128 registers
constexpr int kQuads = 8;                  // quads (4 vocabulary entries) a thread keeps: 32 floats
constexpr int kMaxCluster = 16;            // the largest cluster sm_90 allows (non-portable over 8)
constexpr int64_t kQuadsPerBlock = int64_t(kWarps) * kQuads;
constexpr int64_t kMaxVocab = kMaxCluster * kQuadsPerBlock * 4;

struct Part {
  Soft soft;
  Kl kl;
};

__device__ __forceinline__ Part part_merge(const Part& a, const Part& b) {
  return {soft_merge(a.soft, b.soft), kl_merge(a.kl, b.kl)};
}

template <class T, bool kKl>
__global__ void __launch_bounds__(kThreads, 1)
    resident_kernel(const GumbelParams p, int64_t quads_per_block, float inv_tau) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ Part warp_part[kWarps][kWarp];
  __shared__ Part block_part[2][kWarp];  // by tile parity: read by the other blocks of the cluster
  __shared__ Part total[kWarp];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int csize = static_cast<int>(cluster.num_blocks());
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;

  const SeedOffset so = take_seed_offset(p);

  const int64_t V = p.vocab, inner = p.inner, positions = p.outer * p.inner, J = (V + 3) / 4;
  const T* logits = static_cast<const T*>(p.logits);
  T* y = static_cast<T*>(p.y);
  const int64_t q_first = rank * quads_per_block + warp;
  const int64_t q_end = (rank + 1) * quads_per_block < J ? (rank + 1) * quads_per_block : J;
  const int64_t tiles = (positions + kWarp - 1) / kWarp;
  const int64_t clusters = gridDim.x / csize, cluster_id = blockIdx.x / csize;

  int parity = 0;
  for (int64_t tile = cluster_id; tile < tiles; tile += clusters, parity ^= 1) {
    const int64_t pos = tile * kWarp + lane;
    const bool valid = pos < positions;
    const int64_t base = valid ? (pos / inner) * V * inner + pos % inner : 0;

    // Entries of quad i of this thread: 0 past the vocabulary, the block's range or the positions.
    auto count = [&](int i) -> int {
      const int64_t q = q_first + int64_t(i) * kWarps;
      if (!valid || q >= q_end) return 0;
      return V - 4 * q < 4 ? static_cast<int>(V - 4 * q) : 4;
    };

    // Every load first, so that the noise below is drawn while they are in flight.
    float z[kQuads][4];
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const int64_t q = q_first + int64_t(i) * kWarps;
      load4<false>(logits + base + 4 * q * inner, inner, count(i), z[i]);
    }

    Part part{soft_identity(), kl_identity()};
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const int n = count(i);
      if (n > 0) {
        float g[4];
        gumbel4(so.seed, so.offset, pos, q_first + int64_t(i) * kWarps, g);
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

    // Warps of the block, then blocks of the cluster; fixed orders, so every block gets the same bits.
    warp_part[warp][lane] = part;
    __syncthreads();
    if (warp == 0) {
      Part acc = warp_part[0][lane];
      for (int w = 1; w < kWarps; ++w) acc = part_merge(acc, warp_part[w][lane]);
      block_part[parity][lane] = acc;
    }
    // Makes every block's block_part visible to the cluster; the other parity's entries, written
    // for the next tile, are only read after the next sync.
    cluster.sync();
    if (warp == 0) {
      Part acc = *cluster.map_shared_rank(&block_part[parity][lane], 0);
      for (int r = 1; r < csize; ++r) acc = part_merge(acc, *cluster.map_shared_rank(&block_part[parity][lane], r));
      total[lane] = acc;
    }
    __syncthreads();
    const Part tot = total[lane];

    // The store addresses are recomputed from an opaque copy of the stride: kept from the loads,
    // the row offsets would take registers the cached values need.
    int64_t stride = inner;
    asm volatile("" : "+l"(stride));
    if (valid) {
      if (kKl && rank == 0 && warp == 0) {
        const float plogp = tot.kl.tx / tot.kl.sx - logf(tot.kl.sx);
        static_cast<T*>(p.kl)[pos] = from_float<T>(plogp + logf(static_cast<float>(V)));
      }
      // s == 0 only where every logit of the position is -inf: y = 0 there, as in gumbel_fwd.cu.
      const float f = tot.soft.s > 0.0f && m != neg_inf() ? expf(m - tot.soft.m) / tot.soft.s : 0.0f;
#pragma unroll
      for (int i = 0; i < kQuads; ++i) {
        const int n = count(i);
        if (n > 0) {
          float out[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = z[i][k] * f;
          store4<false>(y + base + 4 * (q_first + int64_t(i) * kWarps) * stride, stride, n, out);
        }
      }
    }
  }
  // No block may leave while another still reads its block_part.
  cluster.sync();
#endif
}

// DALLE_FAST_GUMBEL_RESIDENT=0 keeps every call on the two-sweep kernel; read at every call, so a
// benchmark can time both paths in one process.
bool resident_enabled() {
  const char* value = std::getenv("DALLE_FAST_GUMBEL_RESIDENT");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// A launch of `clusters` clusters of `csize` blocks on `stream`; cfg points at attr.
void cluster_launch(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, int csize, int64_t clusters,
                    cudaStream_t stream) {
  attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(csize);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * csize));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

// Clusters of `csize` blocks of this kernel the device keeps resident at once (0: none fits),
// asked once per (device, cluster size) and kept; entries hold that count + 1, 0 for not asked.
template <class T, bool kKl>
int active_clusters(int device, int csize) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices][kMaxCluster + 1];  // static storage: zero-initialised
  if (device < 0 || device >= kDevices) return 0;
  const int known = cache[device][csize].load(std::memory_order_relaxed);
  if (known > 0) return known - 1;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cluster_launch(cfg, attr, csize, 1, nullptr);
  int n = 0;
  const cudaError_t e =
      csize > 8 ? cudaFuncSetAttribute(resident_kernel<T, kKl>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)
                : cudaSuccess;
  if (e != cudaSuccess || cudaOccupancyMaxActiveClusters(&n, resident_kernel<T, kKl>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the caller falls back to the two-sweep kernel
    n = 0;
  }
  cache[device][csize].store(n + 1, std::memory_order_relaxed);
  return n;
}

template <class T, bool kKl>
bool launch_as(const GumbelParams& p, float inv_tau, cudaStream_t stream, const char** err) {
  int device = 0, major = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major < 9) return false;
  const int64_t J = (p.vocab + 3) / 4;
  const int csize = static_cast<int>((J + kQuadsPerBlock - 1) / kQuadsPerBlock);
  const int64_t quads_per_block = (J + csize - 1) / csize;
  const int active = active_clusters<T, kKl>(device, csize);
  if (active <= 0 || int64_t(active) * csize * 4 < int64_t(sms) * 3) return false;
  const int64_t tiles = (p.outer * p.inner + kWarp - 1) / kWarp;
  const int64_t clusters = tiles < active ? tiles : active;

  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cluster_launch(cfg, attr, csize, clusters, stream);
  const cudaError_t e = cudaLaunchKernelEx(&cfg, resident_kernel<T, kKl>, p, quads_per_block, inv_tau);
  *err = e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  return true;
}

}  // namespace

bool gumbel_forward_resident(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream, const char** err) {
  *err = nullptr;
  if (!resident_enabled() || p.hard || p.inner <= 1 || p.vocab > kMaxVocab) return false;
  const float inv_tau = 1.0f / p.tau;
  switch (dtype) {
    case GumbelDType::Float32:
      return p.with_kl ? launch_as<float, true>(p, inv_tau, stream, err)
                       : launch_as<float, false>(p, inv_tau, stream, err);
    case GumbelDType::Float16:
      return p.with_kl ? launch_as<__half, true>(p, inv_tau, stream, err)
                       : launch_as<__half, false>(p, inv_tau, stream, err);
    case GumbelDType::BFloat16:
      return p.with_kl ? launch_as<__nv_bfloat16, true>(p, inv_tau, stream, err)
                       : launch_as<__nv_bfloat16, false>(p, inv_tau, stream, err);
  }
  return false;
}

}  // namespace dalle_fast::cuda
