// skinny_linear on CUDA: out = act(ln(x) w^T + bias) + residual for m <= 64 rows of x, the shape
// of a sampling step (a batch of one position per sequence), ln an optional layer norm. cuBLAS
// runs these as GEMMs with few blocks and takes ~4 us each on the H100, several times the time
// to read the weights; a step of the 12-layer prior runs 48 of them.
//
// Layout: a block of 8 warps owns 8 output columns (n0 .. n0 + 7) and splits k over its warps in
// blocks of 32; each warp multiplies with mma.m16n8k16 (fp32 accumulators) for up to four m16
// tiles of rows, then the warps' partial tiles are summed in shared memory (in warp order, so
// the result does not depend on timing) and the epilogue writes bias, activation and residual.
// The weights are read once, each lane reading 16 contiguous bytes of one weight row per
// k-block: the mma's k order within a block of 32 is permuted (a dot product does not depend on
// it) so that a lane's fragments of two k-steps are 8 consecutive k of its row, the same for the
// rows of x. Lane (g, t) = (lane / 4, lane % 4) loads w[n0 + g][32 b + 8 t .. + 7] and
// x[r][32 b + 8 t .. + 7] for its rows r = g, g + 8 of each m16 tile; for step s in {0, 1} its
// fragment registers are words 2 s and 2 s + 1 of those 16 bytes (mma.h gives the fragment
// layout): logical k 2t, 2t+1 of step s is k 8t + 4s + 0, 1 of the block and 2t + 8, 2t + 9 is
// 8t + 4s + 2, 3, one bijection for x and w.
//
// With a layer norm, each block first computes every row's mean and variance (a warp per row,
// one pass of shifted sums) while L2 fetches its first weights, then normalises each x fragment
// as it arrives, rounded to T as the layer's output would be.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../../attention/cuda/attention_cuda.h"
#include "../../attention/cuda/mma.h"
#include "../linear_params.h"
#include "linear_cuda.h"

namespace dalle_fast::cuda {

namespace {

using detail::Store;
using detail::to_acc;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kCols = 8;  // output columns per block: the n of mma.m16n8k16

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ float activate(float v, Activation a) {
  return a == Activation::Gelu ? 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)) : v;
}

// The layer norm of the lane's rows of x (kLn): their mean and 1 / std, and the lane's 8 k of
// ln_weight and ln_bias in each 32-block (offset by 8 t like the lane's rows).
template <class T, int kTiles, bool kLn>
struct RowNorm {
  float mean[kTiles][2], rstd[kTiles][2];
  const T* gamma;
  const T* beta;
};

// 8 values of one row (16 bytes of T) normalised: (x - mean) rstd gamma + beta, rounded to T.
template <class T>
__device__ __forceinline__ uint4 normalize(const uint4& x8, float mean, float rstd, const uint4& g8, const uint4& b8) {
  const T* x = reinterpret_cast<const T*>(&x8);
  const T* g = reinterpret_cast<const T*>(&g8);
  const T* b = reinterpret_cast<const T*>(&b8);
  uint32_t out[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float lo = (to_acc(x[2 * e]) - mean) * rstd * to_acc(g[2 * e]) + to_acc(b[2 * e]);
    const float hi = (to_acc(x[2 * e + 1]) - mean) * rstd * to_acc(g[2 * e + 1]) + to_acc(b[2 * e + 1]);
    out[e] = mma::Mma<T>::pack(lo, hi);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Mean and 1 / sqrt(var + eps) of each row of x into stats[row]: warp w takes rows w, w + kWarps,
// ... (at most 2 kTiles), loading all of them in each step over k so that their loads are in
// flight together. One pass of shifted sums (the shift: the row's first value, so that the
// variance does not lose its digits to a large mean).
template <class T, int kTiles>
__device__ __forceinline__ void row_stats(const LinearParams& p, float2* stats) {
  constexpr int kRows = 16 * kTiles / kWarps;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* rows[kRows];
  float shift[kRows], s[kRows], ss[kRows];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int64_t r = warp + int64_t(kWarps) * rr;
    rows[rr] = static_cast<const T*>(p.x) + (r < p.m ? r : p.m - 1) * p.x_stride;
    s[rr] = ss[rr] = 0.0f;
  }
#pragma unroll 2
  for (int64_t k0 = 8 * lane, step = 0; k0 - 8 * lane < p.k; k0 += 8 * 32, ++step) {
    uint4 v[kRows];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) v[rr] = k0 < p.k ? load16(rows[rr] + k0) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const T* e = reinterpret_cast<const T*>(&v[rr]);
      if (step == 0) shift[rr] = __shfl_sync(0xffffffffu, to_acc(e[0]), 0);
      if (k0 < p.k) {
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float d = to_acc(e[q]) - shift[rr];
          s[rr] += d;
          ss[rr] = fmaf(d, d, ss[rr]);
        }
      }
    }
  }
  const float inv_k = 1.0f / static_cast<float>(p.k);
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const float mean_d = detail::warp_sum(s[rr]) * inv_k;
    const float var = fmaxf(detail::warp_sum(ss[rr]) * inv_k - mean_d * mean_d, 0.0f);
    const int64_t r = warp + int64_t(kWarps) * rr;
    if (lane == 0 && r < p.m) stats[r] = make_float2(shift[rr] + mean_d, rsqrtf(var + p.ln_eps));
  }
}

// Adds to c the products of kN k-blocks b, b + kWarps, ..., all of them inside k: every load is
// issued before the first multiply (unconditional loads, so the compiler does not interleave
// them with the multiplies, which would wait a memory latency per block). kLn: x's fragments are
// layer-normalised on the way.
template <class T, int kTiles, int kN, bool kLn>
__device__ __forceinline__ void multiply_blocks(const LinearParams& p, int64_t b, const T* w_row,
                                                const T* const (&x_rows)[kTiles][2], const RowNorm<T, kTiles, kLn>& norm,
                                                float (&c)[kTiles][4]) {
  uint4 wv[kN], xv[kN][kTiles][2], gv[kLn ? kN : 1], bv[kLn ? kN : 1];
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const int64_t at = 32 * (b + int64_t(j) * kWarps);
    wv[j] = load16(w_row + at);
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) xv[j][i][h] = load16(x_rows[i][h] + at);
    }
    if constexpr (kLn) {
      gv[j] = load16(norm.gamma + at);
      bv[j] = load16(norm.beta + at);
    }
  }
  if constexpr (kLn) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          xv[j][i][h] = normalize<T>(xv[j][i][h], norm.mean[i][h], norm.rstd[i][h], gv[j], bv[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        const uint32_t a[4] = {word(xv[j][i][0], 2 * s), word(xv[j][i][1], 2 * s), word(xv[j][i][0], 2 * s + 1),
                               word(xv[j][i][1], 2 * s + 1)};
        mma::Mma<T>::run(c[i], a, word(wv[j], 2 * s), word(wv[j], 2 * s + 1));
      }
    }
  }
}

// kTiles m16 tiles of rows; each warp loads up to kBatch of its k-blocks before multiplying, so
// their loads are in flight together (kBatch (1 + 2 kTiles) 16-byte loads per lane: 24 at most).
// One block per SM's worth of registers: the grid is small (n / 8 blocks), and without the bound
// ptxas interleaves the loads with the multiplies to save registers.
template <class T, int kTiles, bool kLn>
__global__ void __launch_bounds__(kThreads, 1) skinny_linear_kernel(const LinearParams p) {
  constexpr int kBatch = kTiles == 1 ? 8 : kTiles == 2 ? 4 : 2;
  __shared__ float part[kWarps][kTiles][32][4];
  __shared__ float2 stats[kLn ? 16 * kTiles : 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * kCols;
  const T* w_row = static_cast<const T*>(p.w) + (n0 + g) * p.k + 8 * t;
  if constexpr (kLn) {
    // The weights do not wait on the statistics: ask L2 for the warp's first batch meanwhile.
    for (int64_t b = warp; b < p.k / 32 && b < int64_t(kBatch) * kWarps; b += kWarps)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(w_row + 32 * b));
    row_stats<T, kTiles>(p, stats);
    __syncthreads();
  }
  // The lane's rows of x; rows past m read row m - 1 instead (their results are not written),
  // so that no load needs a condition.
  const T* x_rows[kTiles][2];
  RowNorm<T, kTiles, kLn> norm;
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r0 = 16 * i + g + 8 * h, r = r0 < p.m ? r0 : p.m - 1;
      x_rows[i][h] = static_cast<const T*>(p.x) + r * p.x_stride + 8 * t;
      if constexpr (kLn) {
        norm.mean[i][h] = stats[r].x;
        norm.rstd[i][h] = stats[r].y;
      }
    }
  }
  if constexpr (kLn) {
    norm.gamma = static_cast<const T*>(p.ln_weight) + 8 * t;
    norm.beta = static_cast<const T*>(p.ln_bias) + 8 * t;
  }

  float c[kTiles][4];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
  // Batches of kBatch blocks, then at most one of each smaller power of two: a warp's loads wait
  // on about log2(its blocks / kBatch) + 1 memory latencies (one for k = 512, 2048 at m <= 16).
  const int64_t blocks = p.k / 32;
  int64_t b = warp;
  for (; b + int64_t(kBatch - 1) * kWarps < blocks; b += int64_t(kBatch) * kWarps)
    multiply_blocks<T, kTiles, kBatch, kLn>(p, b, w_row, x_rows, norm, c);
  if constexpr (kBatch > 4) {
    if (b + 3 * kWarps < blocks) {
      multiply_blocks<T, kTiles, 4, kLn>(p, b, w_row, x_rows, norm, c);
      b += 4 * kWarps;
    }
  }
  if constexpr (kBatch > 2) {
    if (b + kWarps < blocks) {
      multiply_blocks<T, kTiles, 2, kLn>(p, b, w_row, x_rows, norm, c);
      b += 2 * kWarps;
    }
  }
  if (b < blocks) multiply_blocks<T, kTiles, 1, kLn>(p, b, w_row, x_rows, norm, c);

#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) part[warp][i][lane][e] = c[i][e];
  }
  __syncthreads();
  // C fragment element e of lane (g, t): row g + 8 (e / 2), column 2 t + e % 2 of the tile.
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  for (int idx = threadIdx.x; idx < kTiles * 32 * 4; idx += kThreads) {
    const int i = idx / 128, l = (idx / 4) % 32, e = idx % 4;
    const int64_t row = 16 * i + l / 4 + 8 * (e / 2), col = n0 + 2 * (l % 4) + e % 2;
    if (row >= p.m) continue;
    float v = 0.0f;
#pragma unroll
    for (int wp = 0; wp < kWarps; ++wp) v += part[wp][i][l][e];
    if (bias != nullptr) v += to_acc(bias[col]);
    v = activate(v, p.activation);
    if (residual != nullptr) v += to_acc(residual[row * p.res_stride + col]);
    out[row * p.n + col] = Store<T>::from(v);
  }
}

template <class T, bool kLn>
const char* launch(const LinearParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.n / kCols));
  switch ((p.m + 15) / 16) {
    case 1:
      skinny_linear_kernel<T, 1, kLn><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 2:
      skinny_linear_kernel<T, 2, kLn><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 3:
      skinny_linear_kernel<T, 3, kLn><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      skinny_linear_kernel<T, 4, kLn><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <class T>
const char* launch(const LinearParams& p, cudaStream_t stream) {
  return p.ln_weight != nullptr ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace

const char* skinny_linear(const LinearParams& p, DType dtype, cudaStream_t stream) {
  if (p.m < 1 || p.m > kSkinnyMaxRows || p.k % 32 != 0 || p.n % kCols != 0 || p.n < 1) {
    return "skinny_linear: shape outside the kernel's (m <= 64, k % 32 == 0, n % 8 == 0)";
  }
  switch (dtype) {
    case DType::Float16:
      return launch<__half>(p, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(p, stream);
    default:
      return "skinny_linear: the CUDA kernel supports float16 and bfloat16";
  }
}

}  // namespace dalle_fast::cuda
