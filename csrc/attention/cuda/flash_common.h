// What the flash-style forward (flash_fwd.cu) and backward (flash_bwd.cu) share: tile sizes,
// the padded shared-memory row layout, gathered row loads, the alignment rule (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../cuda_smem.h"
#include "../params.h"
#include "attention_cuda.h"
#include "mma.h"
#include "plan_view.h"

namespace dalle_fast::cuda::flash {

constexpr int kBM = static_cast<int>(kFlashTile);  // rows of the tile a CTA owns, 16 per warp
constexpr int kBN = static_cast<int>(kFlashTile);  // entries per chunk of the tile's list
constexpr int kThreads = 128;
constexpr int kPad = 8;  // 16-bit values of padding per shared row: conflict-free ldmatrix
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ninf() { return __int_as_float(static_cast<int>(0xff800000u)); }

// What a CTA works on: (batch, head) and one tile of the plan, with its list's chunk and entry
// ranges. Blocks run tile-major; `last_first` starts with the last tile (the longest key lists
// of the forward), else with the first (the longest query lists of the backward).
struct CtaWork {
  int64_t b, h;
  int tile, r0, rows;
  int c_begin, c_end, e_begin, e_end;
  int warp, lane, g, t4;  // g = lane / 4, t4 = lane % 4: the mma fragment coordinates

  __device__ __forceinline__ CtaWork(const AttnParams& p, const PlanView& plan, const PlanLists& lists,
                                     bool last_first) {
    const int64_t BH = p.batch * p.heads, flat = blockIdx.x;
    tile = static_cast<int>(flat / BH);
    if (last_first) tile = plan.tiles - 1 - tile;
    const int64_t bh = flat % BH;
    b = bh / p.heads;
    h = bh % p.heads;
    r0 = tile * kBM;
    rows = min(kBM, plan.seq - r0);
    c_begin = lists.chunk_start[tile];
    c_end = lists.chunk_start[tile + 1];
    e_begin = lists.start[tile];
    e_end = lists.start[tile + 1];
    warp = threadIdx.x / 32;
    lane = threadIdx.x % 32;
    g = lane / 4;
    t4 = lane % 4;
  }
  // Entries of chunk c: [first(c), first(c) + count(c)) of the list.
  __device__ __forceinline__ int first(int c) const { return e_begin + (c - c_begin) * kBN; }
  __device__ __forceinline__ int count(int c) const { return min(kBN, e_end - first(c)); }
};

// Queues the copy of `rows` shared rows of HD values: row r < count is row pos(r) of `src`,
// rows count..rows-1 are zeros (so padding rows contribute 0 * 0, never 0 * garbage).
template <class T, int HD, class Pos>
__device__ __forceinline__ void load_rows(T* dst, const BHND& src, int64_t b, int64_t h, int rows, int count,
                                          Pos pos) {
  constexpr int kVec = 8;  // 16 bytes
  constexpr int kPerRow = HD / kVec;
  const T* fallback = src.row<const T>(b, h, 0);
  for (int i = threadIdx.x; i < rows * kPerRow; i += kThreads) {
    const int r = i / kPerRow, col = (i % kPerRow) * kVec;
    const bool valid = r < count;
    const T* s = valid ? src.row<const T>(b, h, pos(r)) + col : fallback;
    mma::cp_async16(dst + r * (HD + kPad) + col, s, valid ? 16 : 0);
  }
}

// The rows of one chunk of a tile's list, gathered a chunk ahead: fetch() reads the chunk's
// physical positions into registers with plain loads, whose latency the current chunk's math
// hides; copy() later queues the cp.async of those rows (padding rows: zeros). Thread t handles
// the 16-byte pieces t, t + kThreads, ... of the chunk's kBN x HD values.
template <int HD>
struct ChunkRows {
  static constexpr int kPerRow = HD / 8;
  static constexpr int kCount = kBN * kPerRow / kThreads;
  static_assert(kBN * kPerRow % kThreads == 0, "a chunk's pieces must split evenly over the threads");
  int pos[kCount];  // -1: a padding row

  __device__ __forceinline__ void fetch(const int32_t* list, int count) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int r = (static_cast<int>(threadIdx.x) + i * kThreads) / kPerRow;
      pos[i] = r < count ? list[r] : -1;
    }
  }
  template <class T>
  __device__ __forceinline__ void copy(T* dst, const BHND& src, int64_t b, int64_t h) const {
    const T* fallback = src.row<const T>(b, h, 0);
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int j = static_cast<int>(threadIdx.x) + i * kThreads, r = j / kPerRow, col = (j % kPerRow) * 8;
      const bool valid = pos[i] >= 0;
      mma::cp_async16(dst + r * (HD + kPad) + col, valid ? src.row<const T>(b, h, pos[i]) + col : fallback,
                      valid ? 16 : 0);
    }
  }
};

// A chunk's mask bits for this thread's two fragment rows (tile rows 16 warp + g and + 8), and
// whether the chunk needs none; loaded a chunk ahead like ChunkRows. Bit k of w[i]: key k allowed.
struct ChunkMask {
  uint64_t w[2];
  bool full;

  __device__ __forceinline__ void fetch(const PlanLists& lists, int c, int warp, int g) {
    full = lists.full[c] != 0;
    w[0] = lists.words[int64_t(c) * kBN + warp * 16 + g];
    w[1] = lists.words[int64_t(c) * kBN + warp * 16 + g + 8];
  }
};

// acc[j] (16 x 8 tile j) = A B^T for this warp: A = 16 shared rows at `a` (row stride HD + kPad),
// B = kBN shared rows at `b`, both HD long; the result is 16 x kBN in C fragments.
template <class T, int HD>
__device__ __forceinline__ void rows_times_rows(float (&acc)[kBN / 8][4], const T* a, const T* b, int lane) {
  using M = mma::Mma<T>;
  constexpr int LD = HD + kPad;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t af[4];
    mma::ldmatrix_x4(af, a + (lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < kBN / 16; ++np) {
      uint32_t bf[4];
      mma::ldmatrix_x4(bf, b + (np * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
      M::run(acc[2 * np], af, bf[0], bf[1]);
      M::run(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x HD) += P B for this warp: P = 16 x kBN in C fragments (converted to T, the C
// layout of two 8-column tiles being the A layout of 16 columns), B = kBN shared rows at `b`.
template <class T, int HD>
__device__ __forceinline__ void probs_times_rows(float (&acc)[HD / 8][4], const float (&p)[kBN / 8][4], const T* b,
                                                 int lane) {
  using M = mma::Mma<T>;
  constexpr int LD = HD + kPad;
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    const uint32_t pa[4] = {M::pack(p[2 * kk][0], p[2 * kk][1]), M::pack(p[2 * kk][2], p[2 * kk][3]),
                            M::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]), M::pack(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t bf[4];
      mma::ldmatrix_x4_trans(bf, b + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LD + dp * 16 + (lane / 16) * 8);
      M::run(acc[2 * dp], pa, bf[0], bf[1]);
      M::run(acc[2 * dp + 1], pa, bf[2], bf[3]);
    }
  }
}

using detail::aligned16;  // attention_cuda.h

inline bool supported(const AttnParams& p, DType dtype) {
  return (dtype == DType::Float16 || dtype == DType::BFloat16) && (p.dim == 32 || p.dim == 64 || p.dim == 128) &&
         aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
}

// Whether the current device runs these kernels (mma.m16n8k16 and cp.async need sm_80) with
// `bytes` of dynamic shared memory per CTA: the D=128 backward's 112 KiB exceed the 99 KiB that
// sm_86/89/120 cards allow, and such calls take the one-warp-per-row kernels instead of failing.
// Cached per device: two attribute queries are cheap, but not free on every launch.
inline bool device_fits(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static int optin[kMaxDevices];  // 0: not asked yet; -1: not sm_80+; else the opt-in limit
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return false;
  if (optin[dev] == 0) {
    int major = 0, limit = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    optin[dev] = major >= 8 && limit > 0 ? limit : -1;
  }
  return optin[dev] > 0 && bytes <= size_t(optin[dev]);
}


}  // namespace dalle_fast::cuda::flash
