// What the flash-style forward (flash_fwd.cu) and backward (flash_bwd.cu) share: tile sizes,
// the padded shared-memory row layout, gathered row loads, the alignment rule (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

// Rows of 16 bytes' alignment everywhere: what cp.async of 16 bytes needs.
inline bool aligned16(const BHND& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.sb % 8 == 0 && t.sh % 8 == 0 && t.sn % 8 == 0;
}

inline bool supported(const AttnParams& p, DType dtype) {
  return (dtype == DType::Float16 || dtype == DType::BFloat16) && (p.dim == 32 || p.dim == 64 || p.dim == 128) &&
         aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
}

// Sets the dynamic shared memory limit a launch needs beyond the default 48 KiB.
template <class Kernel>
inline const char* allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return nullptr;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace dalle_fast::cuda::flash
