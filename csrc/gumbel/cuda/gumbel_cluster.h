// The thread-block-cluster layout shared by the one-read Gumbel kernels (gumbel_fwd_resident.cu,
// gumbel_bwd_resident.cu), for logits whose softmax dimension is strided (inner > 1):
//   - a cluster of C blocks (sm_90 thread-block clusters, C <= 16) owns a tile of 32 adjacent
//     positions; block r takes the vocabulary quads [r * Qc, (r + 1) * Qc), warp w of a block
//     the quads w, w + kWarps, ... of those (at most the kernel's kQuads), and lane l position l
//     of the tile, so a warp reads 32 adjacent positions of one vocabulary row (coalesced);
//   - a thread keeps its values of the tile in registers (and shared memory), so each element is
//     read once; the per-position statistics are combined over the warps in shared memory, then
//     over the cluster's blocks through distributed shared memory, every block in the same rank
//     order, so all threads of a position get the same bits.
//   - each kernel has two paths per tile: the full one, where every position of the tile exists
//     and every thread has its whole quota of whole quads (whole_block, full_tile: the dVAE's
//     shapes), walks the entries with a Cursor and checks none of them; the general one checks
//     every quad against the vocabulary and the positions.
// Sizes: 512 threads of at most 128 registers, one block per SM. The forward's threads keep 16
// quads (64 floats) in registers, so V = 8192 takes clusters of 8; clusters of 9 to 16, a size
// sm_90 allows only as non-portable, cover up to 16384. Where the device cannot keep clusters on
// at least 3/4 of its SMs (small GPCs), the callers run the two-sweep kernels instead.
// DALLE_FAST_GUMBEL_RESIDENT (mode() below) turns these kernels off or makes them required.
#pragma once

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../../cuda_smem.h"
#include "../../env_switch.h"
#include "../gumbel_params.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda::gumbel_cluster {

using gumbel_detail::kWarp;
namespace cg = cooperative_groups;

constexpr int kWarps = 16;                // warps per block
constexpr int kThreads = kWarps * kWarp;  // 512: one block per SM with up to 128 registers
constexpr int kMaxCluster = 16;           // the largest cluster sm_90 allows (non-portable over 8)

// The largest vocabulary a kernel whose threads keep `quads` quads (4 entries each) covers.
constexpr int64_t max_vocab(int quads) { return int64_t(kMaxCluster) * kWarps * quads * 4; }

// Cluster device code compiles for sm_90 and later only (and in the host pass, which sees the
// declarations): the kernels' bodies and these helpers are left out of older architectures'
// device code, where the callers never launch them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define DF_GUMBEL_CLUSTERS 1
#else
#define DF_GUMBEL_CLUSTERS 0
#endif

// ---- Device ---------------------------------------------------------------------------------
// A thread's position in one tile: its flat index, whether it exists, and where its vocabulary
// starts in the [outer, vocab, inner] logits.
struct TilePos {
  int64_t pos;
  bool valid;
  int64_t base;
};

// A thread's place in the cluster layout. Its cluster takes tiles cluster_id, cluster_id +
// clusters, ... of `tiles`.
struct Place {
  int lane, warp, rank, csize;
  int64_t q_first;  // the thread's first quad
  int64_t q_end;    // end of its block's quads
  int64_t clusters, cluster_id, tiles;

  __device__ __forceinline__ TilePos at(int64_t tile, const GumbelParams& p) const {
    const int64_t pos = tile * kWarp + lane;
    const bool valid = pos < p.outer * p.inner;
    return {pos, valid, valid ? (pos / p.inner) * p.vocab * p.inner + pos % p.inner : 0};
  }

  __device__ __forceinline__ int64_t quad(int i) const { return q_first + int64_t(i) * kWarps; }
  // A copy whose quad range the compiler cannot see through. A loop over the quads that takes it
  // computes their indices itself: otherwise they are tile-invariant, hoisted out of the tile loop
  // and kept in registers (two per quad), which spilled the cached values.
  __device__ __forceinline__ Place fresh() const {
    Place c = *this;
    asm volatile("" : "+l"(c.q_first), "+l"(c.q_end));
    return c;
  }
  // Entries of the thread's quad i at a position: 0 past the vocabulary, the block's range or the
  // positions (valid false).
  __device__ __forceinline__ int count(int i, bool valid, int64_t V) const {
    const int64_t q = quad(i);
    if (!valid || q >= q_end) return 0;
    return V - 4 * q < 4 ? static_cast<int>(V - 4 * q) : 4;
  }
};

// The row offsets of a tile are recomputed from an opaque copy of the stride after the
// combination: kept from the loads, they would take registers the cached values need.
__device__ __forceinline__ int64_t opaque(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// The entries of a thread's quads in a full tile (see whole_block), in the order quad 0 entries
// 0..3, quad 1 entries 0..3, ...: one pointer advanced by inner within a quad and by
// (4 kWarps - 3) inner to the next quad, two adds per entry instead of multiplying out an index.
template <class T>
struct Cursor {
  T* ptr;
  int64_t inner, quad_step;
  __device__ __forceinline__ Cursor(T* data, const Place& pl, const TilePos& tp, int64_t inner_)
      : ptr(data + tp.base + 4 * pl.q_first * inner_), inner(inner_), quad_step((4 * kWarps - 3) * inner_) {}
  // Entry k of the current quad; entry 3 moves on to the next quad.
  __device__ __forceinline__ T* next(int k) {
    T* at = ptr;
    ptr += k < 3 ? inner : quad_step;
    return at;
  }
};

// Whether every thread of the block has `quads` whole quads: the block covers kWarps * quads quads
// of 4 entries (the dVAE's V = 8192 in clusters of 8). Then, in tiles where every position exists
// (full_tile), the kernels read and write without a check per entry (each compiles to a branch)
// and walk the entries with a Cursor.
__device__ __forceinline__ bool whole_block(const Place& pl, int64_t quads_per_block, int quads, int64_t V) {
  return quads_per_block == int64_t(kWarps) * quads && pl.q_end - pl.rank * quads_per_block == quads_per_block &&
         4 * pl.q_end <= V;
}
__device__ __forceinline__ bool full_tile(int64_t tile, const GumbelParams& p) {
  return (tile + 1) * kWarp <= p.outer * p.inner;
}

// Writes the thread's quads of one tile to data ([outer, vocab, inner]), quad i's four values
// from values(i, out): kFull as a Cursor walk (see whole_block), else each quad checked against
// the vocabulary and the positions, as the kernels read them. The stride comes from an opaque
// copy: kept from the loads, it would take registers the cached values need.
template <bool kFull, int kQuads, class T, class Values>
__device__ __forceinline__ void write_tile(T* data, const GumbelParams& p, const Place& place, const TilePos& tp,
                                           Values values) {
  const int64_t stride = opaque(p.inner);
  if constexpr (kFull) {
    Cursor<T> dst(data, place.fresh(), tp, stride);
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      float out[4];
      values(i, out);
#pragma unroll
      for (int k = 0; k < 4; ++k) *dst.next(k) = gumbel_detail::from_float<T>(out[k]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const Place ql = place.fresh();
      const int n = ql.count(i, tp.valid, p.vocab);
      if (n > 0) {
        float out[4];
        values(i, out);
        gumbel_detail::store4<false>(data + tp.base + 4 * ql.quad(i) * stride, stride, n, out);
      }
    }
  }
}

#if DF_GUMBEL_CLUSTERS
__device__ __forceinline__ Place place(const cg::cluster_group& cluster, const GumbelParams& p,
                                       int64_t quads_per_block) {
  const int64_t J = (p.vocab + 3) / 4;
  Place pl;
  pl.rank = static_cast<int>(cluster.block_rank());
  pl.csize = static_cast<int>(cluster.num_blocks());
  pl.lane = static_cast<int>(threadIdx.x) % kWarp;
  pl.warp = static_cast<int>(threadIdx.x) / kWarp;
  pl.q_first = pl.rank * quads_per_block + pl.warp;
  pl.q_end = (pl.rank + 1) * quads_per_block < J ? (pl.rank + 1) * quads_per_block : J;
  pl.clusters = gridDim.x / pl.csize;
  pl.cluster_id = blockIdx.x / pl.csize;
  pl.tiles = (p.outer * p.inner + kWarp - 1) / kWarp;
  return pl;
}

// Shared memory of the combination: per warp, per block (by tile parity: the other blocks of the
// cluster read it), and the position totals.
template <class Part>
struct Exchange {
  Part warp_part[kWarps][kWarp];
  Part block_part[2][kWarp];
  Part total[kWarp];
};

// Every thread's `part` combined over its position's threads in the cluster (warps in order,
// then blocks in rank order): the same bits in every block. Call from all threads of all blocks
// of the cluster once per tile, alternating `parity`. Contains block and cluster barriers; after
// the last tile, the kernel must cluster.sync() once more before it exits (other blocks may still
// read its block_part).
template <class Part, class Merge>
__device__ __forceinline__ Part combine(Exchange<Part>& ex, const Part& part, const Place& pl, int parity,
                                        cg::cluster_group& cluster, Merge merge) {
  ex.warp_part[pl.warp][pl.lane] = part;
  __syncthreads();
  if (pl.warp == 0) {
    Part acc = ex.warp_part[0][pl.lane];
    for (int w = 1; w < kWarps; ++w) acc = merge(acc, ex.warp_part[w][pl.lane]);
    ex.block_part[parity][pl.lane] = acc;
  }
  // Publishes every block's block_part[parity] to the cluster. The blocks write the other parity
  // for the next tile, which is only read after the next sync; this parity is rewritten two tiles
  // on, after every block has passed the next sync, so after its reads below.
  cluster.sync();
  if (pl.warp == 0) {
    Part acc = *cluster.map_shared_rank(&ex.block_part[parity][pl.lane], 0);
    for (int r = 1; r < pl.csize; ++r) acc = merge(acc, *cluster.map_shared_rank(&ex.block_part[parity][pl.lane], r));
    ex.total[pl.lane] = acc;
  }
  __syncthreads();
  return ex.total[pl.lane];
}
#endif  // DF_GUMBEL_CLUSTERS


// ---- Host -----------------------------------------------------------------------------------
// DALLE_FAST_GUMBEL_RESIDENT, read at every call (so a benchmark can time both paths in one
// process): "0" keeps every call on the two-sweep kernels; "require" makes a call whose shape the
// one-read kernels take fail where the device cannot run them (before sm_90, too few clusters
// resident) instead of falling back, so a test can tell that they ran; anything else, or unset,
// the default: the one-read kernels where they can run.
enum class Mode { Off, Auto, Require };
inline Mode mode() {
  if (env_is("DALLE_FAST_GUMBEL_RESIDENT", "0")) return Mode::Off;
  return env_is("DALLE_FAST_GUMBEL_RESIDENT", "require") ? Mode::Require : Mode::Auto;
}
inline bool enabled() { return mode() != Mode::Off; }

// For a call that fits the layout but that plan() refused: the two-sweep kernel (false), or under
// "require" an error in *err (true: the caller returns it).
inline bool refuse(const char** err) {
  if (mode() != Mode::Require) return false;
  *err = "DALLE_FAST_GUMBEL_RESIDENT=require, but this device cannot run the one-read kernel "
         "(before sm_90, built without sm_90 device code, or too few clusters resident)";
  return true;
}

// Whether logits of this shape fit the layout of a kernel whose threads keep `quads` quads.
inline bool fits(const GumbelParams& p, int quads) { return p.inner > 1 && p.vocab <= max_vocab(quads); }

// A launch of `clusters` clusters of `csize` blocks with `smem` dynamic shared memory on `stream`;
// cfg points at attr.
inline void launch_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, int csize, int64_t clusters,
                          size_t smem, cudaStream_t stream) {
  attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(csize);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * csize));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

// Clusters of `csize` blocks of Kernel (with `smem` dynamic shared memory, the same at every call)
// the device keeps resident at once, asked once per (device, cluster size) and kept; entries hold
// that count + 1, 0 for not asked. 0 where the layout does not apply: a device before sm_90,
// device code built for an older architecture (an sm_80 PTX that the driver compiled for this
// device has empty kernel bodies), or clusters resident on fewer than 3/4 of the SMs (small
// GPCs). Sets the kernel's attributes on the way.
template <auto Kernel>
int active_clusters(int device, int csize, size_t smem) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices][kMaxCluster + 1];  // static storage: zero-initialised
  if (device < 0 || device >= kDevices) return 0;
  const int known = cache[device][csize].load(std::memory_order_relaxed);
  if (known > 0) return known - 1;
  int n = 0, major = 0, sms = 0;
  cudaFuncAttributes fattr;
  bool failed = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
                cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess;
  if (!failed && major >= 9) failed = cudaFuncGetAttributes(&fattr, Kernel) != cudaSuccess;
  if (!failed && major >= 9 && fattr.ptxVersion >= 90) {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr;
    launch_config(cfg, attr, csize, 1, smem, nullptr);
    failed = (csize > 8 && cudaFuncSetAttribute(Kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
                               cudaSuccess) ||
             allow_dynamic_smem<Kernel>(smem) != nullptr ||
             cudaOccupancyMaxActiveClusters(&n, Kernel, &cfg) != cudaSuccess;
    if (failed || int64_t(n) * csize * 4 < int64_t(sms) * 3) n = 0;
  }
  if (failed) (void)cudaGetLastError();  // clear it: the caller falls back to the two-sweep kernel
  cache[device][csize].store(n + 1, std::memory_order_relaxed);
  return n;
}

// How Kernel, whose threads keep `quads_per_thread` quads, would cover p's vocabulary.
struct Plan {
  int csize = 0;                // blocks per cluster
  int64_t quads_per_block = 0;  // Qc
  int active = 0;               // clusters resident at once
  size_t smem = 0;              // dynamic shared memory per block
};

// False where the layout does not apply (active_clusters says where). Call after
// fits(p, quads_per_thread).
template <auto Kernel>
bool plan(const GumbelParams& p, int quads_per_thread, size_t smem, Plan* out) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const int64_t J = (p.vocab + 3) / 4, per_block = int64_t(kWarps) * quads_per_thread;
  const int64_t csize = (J + per_block - 1) / per_block;
  if (csize > kMaxCluster) return false;  // fits() rules it out; kept as the cache's bound
  Plan c;
  c.csize = static_cast<int>(csize);
  c.quads_per_block = (J + csize - 1) / csize;
  c.smem = smem;
  c.active = active_clusters<Kernel>(device, c.csize, smem);
  if (c.active <= 0) return false;
  *out = c;
  return true;
}

// Enqueues Kernel(p, quads_per_block, 1 / tau) over the positions of p as planned; returns the
// launch error or nullptr.
template <auto Kernel>
const char* launch(const GumbelParams& p, const Plan& c, cudaStream_t stream) {
  const int64_t tiles = (p.outer * p.inner + kWarp - 1) / kWarp;
  const int64_t clusters = tiles < c.active ? tiles : c.active;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  launch_config(cfg, attr, c.csize, clusters, c.smem, stream);
  const cudaError_t e = cudaLaunchKernelEx(&cfg, Kernel, p, c.quads_per_block, 1.0f / p.tau);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace dalle_fast::cuda::gumbel_cluster
#endif  // __CUDACC__
