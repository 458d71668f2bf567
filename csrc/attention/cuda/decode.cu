// sparse_decode on CUDA: one block of 128 threads per (batch, head). The query's position g is
// read from device memory, so a captured CUDA graph replays the same launch for every step.
// Warps compute the scores of the step's keys (lanes over the head dim), the block reduces
// max and sum, then threads over the head dim add up the values. Scores live in shared memory
// with each key's row (8 bytes per key: T + K keys), so the value sum reads neither the offsets
// nor the position again.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../decode_params.h"
#include "attention_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace detail;

// Block-wide reduction (max or sum) of one float per thread; every thread gets the result.
template <class Op>
__device__ __forceinline__ float block_reduce(float x, float* scratch, Op op) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, off));
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kWarpsPerBlock; ++w) x = op(x, scratch[w]);
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
  const T* q = static_cast<const T*>(p.q) + bh * D;
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

template <class T>
const char* launch(const DecodeParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.heads;
  if (blocks == 0 || p.dim == 0) return nullptr;
  if (blocks > int64_t(0x7fffffff)) return "sparse_decode: too many (batch, head) pairs for one launch";
  if (p.seq > int64_t(0x7fffffff)) return "sparse_decode: sequence too long for 32-bit key rows";
  const size_t smem = size_t(p.num_keys()) * (sizeof(float) + sizeof(int32_t));
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  decode_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
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
