// CUDA sparse-attention launchers: plain AttnParams in, no torch types, so the .cu files stay
// free of ATen headers. attention_cuda.cpp validates the tensors and calls these.
//
// Storage dtypes: float, double, __half, __nv_bfloat16. Accumulation is float (double for
// double); the lse / delta statistics are float (double for double).
#pragma once

#include <cuda_runtime.h>

#include "../decode_params.h"
#include "../params.h"
#include "plan_view.h"

namespace dalle_fast::cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Enqueues the forward kernel on `stream`: fills p.out and p.lse. No host synchronisation.
// Returns nullptr on success, else a static error message (launch / configuration errors only;
// errors raised while the kernel runs surface at the next synchronising call, as usual).
const char* attention_forward(const AttnParams& p, DType dtype, cudaStream_t stream);

// Enqueues the backward kernels on `stream`: fills p.delta (a [B, H, N] workspace of the
// statistics type), then p.dq, p.dk, p.dv. p.out, p.lse and p.dout must be set. Same return
// convention as attention_forward.
const char* attention_backward(const AttnParams& p, DType dtype, cudaStream_t stream);

// Only the first of those: p.delta = rowsum(p.dout * p.out).
const char* attention_delta(const AttnParams& p, DType dtype, cudaStream_t stream);

// One sampling step's attention (decode.cu): float32, float16, bfloat16; p.g in device memory.
const char* sparse_decode(const DecodeParams& p, DType dtype, cudaStream_t stream);

// The flash-style tensor-core kernels (flash_fwd.cu, flash_bwd.cu): fp16/bf16, head dims 32,
// 64, 128, rows 16-byte aligned. `plan` is device_plan(p.mask, kFlashTile, device). The forward
// fills p.out and p.lse like attention_forward. The backward needs p.delta (attention_delta),
// writes p.dk and p.dv, and adds dq into `dq_acc`, a zeroed contiguous fp32 [B, H, N, D].
constexpr int64_t kFlashTile = 64;
bool flash_forward_supported(const AttnParams& p, DType dtype);
const char* flash_forward(const AttnParams& p, const PlanView& plan, DType dtype, cudaStream_t stream);
bool flash_backward_supported(const AttnParams& p, DType dtype);
const char* flash_backward(const AttnParams& p, const PlanView& plan, float* dq_acc, DType dtype,
                           cudaStream_t stream);

}  // namespace dalle_fast::cuda

// ---- Device helpers shared by attention_fwd.cu and attention_bwd.cu (nvcc only). ----------
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dalle_fast::cuda::detail {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // one warp per row (query or key); 4 rows per block
constexpr int kThreads = kWarp * kWarpsPerBlock;

// Accumulate / statistics type of a storage type.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
struct Store;
template <>
struct Store<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
};
template <>
struct Store<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
};
template <>
struct Store<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float neg_inf(float) { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ __forceinline__ double neg_inf(double) {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// Sum over the 32 lanes of a warp; every lane gets the result.
template <class A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Rows of 16 bytes' alignment everywhere, for 16-bit storage (base pointer and every stride a
// multiple of 8 elements): what 16-byte vector loads and cp.async of 16 bytes need.
inline bool aligned16(const BHND& t) {
  return reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.sb % 8 == 0 && t.sh % 8 == 0 && t.sn % 8 == 0;
}

// Blocks for `rows` warps-rows (kernels loop grid-stride, so any cap is correct).
inline unsigned int grid_for_rows(int64_t rows) {
  int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = int64_t(1) << 30;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

// Output dims per lane per pass: the smallest of 1, 2, 4, 8 with 32 * R >= D (8 beyond 256;
// then the kernels make ceil(D / 256) passes, recomputing the scores in each).
inline int dims_per_lane(int64_t D) {
  if (D <= 1 * kWarp) return 1;
  if (D <= 2 * kWarp) return 2;
  if (D <= 4 * kWarp) return 4;
  return 8;
}

}  // namespace dalle_fast::cuda::detail
#endif  // __CUDACC__
