// sparse_decode on CUDA: one block of 128 threads per (batch, head). The query's position g is
// read from device memory, so a captured CUDA graph replays the same launch for every step.
// Scores live in shared memory with each key's row (8 bytes per key: T + K keys), so the value
// sum reads neither the offsets nor the position again. Two kernels:
//   decode_fast_kernel (fp16 / bf16, head dim 32, 64 or 128, 16-byte aligned rows; what the
//     sampler runs): blocks of 512 threads, as a step's few (batch, head) pairs leave most of
//     the GPU idle and the kernel is bound by load latency. A thread per key computes its whole
//     score from 16-byte loads, so every key of a step (text + image keys: ~300 at 32x32) is in
//     flight at once; for the values, warp w of 16 sums keys w, w + 16, ..., each lane D / 32
//     dims of a key's row (a coalesced row read per key, no branch, unrolled so several rows
//     are in flight), and the warps' sums are added in shared memory.
//   decode_kernel (any dtype and head dim): warps over keys with lanes over the head dim for
//     the scores, threads over the head dim for the values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../decode_params.h"
#include "attention_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace detail;

// Block-wide reduction (max or sum) of one float per thread of kWarps warps; every thread gets
// the result.
template <int kWarps = kWarpsPerBlock, class Op>
__device__ __forceinline__ float block_reduce(float x, float* scratch, Op op) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, off));
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kWarps; ++w) x = op(x, scratch[w]);
  __syncthreads();  // scratch is reused by the next reduction
  return x;
}

template <class T>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  extern __shared__ float scores[];  // [num_keys], then the keys' rows as int32 [num_keys]
  __shared__ float scratch[kWarpsPerBlock];
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t g = *p.g, n = p.num_keys(), D = p.dim;
  const T* q = p.q_row<T>(b, h);
  const float scale = static_cast<float>(p.scale);
  const float ninf = neg_inf(0.f);
  int32_t* const rows = reinterpret_cast<int32_t*>(scores + n);

  for (int64_t j = warp; j < n; j += kWarpsPerBlock) {
    const int64_t key = p.key(j, g);
    if (lane == 0) rows[j] = static_cast<int32_t>(key);
    float s = 0.f;
    if (key >= 0) {
      const T* k = p.k.row<const T>(b, h, key);
      for (int64_t d = lane; d < D; d += kWarp) s += to_acc(q[d]) * to_acc(k[d]);
      s = warp_sum(s);
    }
    if (lane == 0) scores[j] = key >= 0 ? s * scale : ninf;
  }
  __syncthreads();

  float top = ninf;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) top = fmaxf(top, scores[j]);
  top = block_reduce(top, scratch, [](float a, float c) { return fmaxf(a, c); });
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const float e = scores[j] == ninf ? 0.f : __expf(scores[j] - top);
    scores[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, scratch, [](float a, float c) { return a + c; });  // its barrier publishes scores

  T* out = static_cast<T*>(p.out) + bh * D;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float w = scores[j];
      if (w != 0.f) acc += w * to_acc(p.v.row<const T>(b, h, rows[j])[d]);
    }
    out[d] = Store<T>::from(acc * inv);
  }
}

// HD / 32 consecutive values (1, 2 or 4 of a 16-bit type) from one aligned load.
template <class T, int kPer>
__device__ __forceinline__ void load_values(const T* src, float (&out)[kPer]) {
  if constexpr (kPer == 1) {
    out[0] = to_acc(*src);
  } else {
    using Word = std::conditional_t<kPer == 2, uint32_t, uint2>;
    const Word w = *reinterpret_cast<const Word*>(src);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[i] = to_acc(e[i]);
  }
}

constexpr int kFastWarps = 16;
constexpr int kFastThreads = kFastWarps * kWarp;

template <class T, int HD>
__global__ void __launch_bounds__(kFastThreads) decode_fast_kernel(const DecodeParams p) {
  extern __shared__ float scores[];  // [num_keys], then the keys' rows as int32 [num_keys]
  __shared__ float qs[HD];
  __shared__ float partial[kFastWarps][HD];
  __shared__ float scratch[kFastWarps];
  constexpr int kPer = HD / kWarp;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t g = *p.g;
  const int n = static_cast<int>(p.num_keys());
  const float scale = static_cast<float>(p.scale);
  const float ninf = neg_inf(0.f);
  int32_t* const rows = reinterpret_cast<int32_t*>(scores + n);

  const T* q = p.q_row<T>(b, h);
  for (int d = threadIdx.x; d < HD; d += kFastThreads) qs[d] = to_acc(q[d]);
  __syncthreads();

  for (int j = threadIdx.x; j < n; j += kFastThreads) {
    const int64_t key = p.key(j, g);
    float s = ninf;
    if (key >= 0) {
      const uint4* k = reinterpret_cast<const uint4*>(p.k.row<const T>(b, h, key));
      uint4 w[HD / 8];
#pragma unroll
      for (int c = 0; c < HD / 8; ++c) w[c] = k[c];
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; ++c) {
        const T* e = reinterpret_cast<const T*>(&w[c]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(qs[8 * c + i], to_acc(e[i]), acc);
      }
      s = acc * scale;
    }
    scores[j] = s;
    rows[j] = key >= 0 ? static_cast<int32_t>(key) : 0;  // a readable row; its weight is 0
  }
  __syncthreads();

  float top = ninf;
  for (int j = threadIdx.x; j < n; j += kFastThreads) top = fmaxf(top, scores[j]);
  top = block_reduce<kFastWarps>(top, scratch, [](float a, float c) { return fmaxf(a, c); });
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += kFastThreads) {
    const float e = scores[j] == ninf ? 0.f : __expf(scores[j] - top);
    scores[j] = e;
    sum += e;
  }
  sum = block_reduce<kFastWarps>(sum, scratch, [](float a, float c) { return a + c; });  // its barrier publishes scores

  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
#pragma unroll 4
  for (int j = warp; j < n; j += kFastWarps) {
    const float w = scores[j];
    float v[kPer];
    load_values<T, kPer>(p.v.row<const T>(b, h, rows[j]) + lane * kPer, v);
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] += w != 0.f ? w * v[i] : 0.f;  // a masked row's values may be anything
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) partial[warp][lane * kPer + i] = acc[i];
  __syncthreads();
  T* out = static_cast<T*>(p.out) + bh * HD;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int d = threadIdx.x; d < HD; d += kFastThreads) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kFastWarps; ++w) total += partial[w][d];
    out[d] = Store<T>::from(total * inv);
  }
}

template <auto Kernel, int kBlock>
const char* launch_kernel(const DecodeParams& p, cudaStream_t stream) {
  const size_t smem = size_t(p.num_keys()) * (sizeof(float) + sizeof(int32_t));
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  Kernel<<<static_cast<unsigned int>(p.batch * p.heads), kBlock, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T>
const char* launch(const DecodeParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.heads;
  if (blocks == 0 || p.dim == 0) return nullptr;
  if (blocks > int64_t(0x7fffffff)) return "sparse_decode: too many (batch, head) pairs for one launch";
  if (p.seq > int64_t(0x7fffffff)) return "sparse_decode: sequence too long for 32-bit key rows";
  if constexpr (sizeof(T) == 2) {
    const bool fast = aligned16(p.k) && aligned16(p.v);  // q and out are read and written by element
    if (fast && p.dim == 32) return launch_kernel<decode_fast_kernel<T, 32>, kFastThreads>(p, stream);
    if (fast && p.dim == 64) return launch_kernel<decode_fast_kernel<T, 64>, kFastThreads>(p, stream);
    if (fast && p.dim == 128) return launch_kernel<decode_fast_kernel<T, 128>, kFastThreads>(p, stream);
  }
  return launch_kernel<decode_kernel<T>, kThreads>(p, stream);
}

}  // namespace

const char* sparse_decode(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch<float>(p, stream);
    case DType::Float16:
      return launch<__half>(p, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(p, stream);
    default:
      return "sparse_decode: the CUDA kernel supports float32, float16 and bfloat16";
  }
}

}  // namespace dalle_fast::cuda
