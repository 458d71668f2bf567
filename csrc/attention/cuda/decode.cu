// sparse_decode on CUDA: one block of 128 threads per (batch, head). The query's position g is
// read from device memory, so a captured CUDA graph replays the same launch for every step.
// Scores live in shared memory with each key's row (8 bytes per key: T + K keys), so the value
// sum reads neither the offsets nor the position again. Two kernels:
//   decode_fast_kernel (fp16 / bf16, head dim 32, 64 or 128, 16-byte aligned rows; what the
//     sampler runs): blocks of 512 threads, as a step's few (batch, head) pairs leave most of
//     the GPU idle and the kernel is bound by load latency. Thread t takes the 16-byte chunk
//     t % (D / 8) of keys t / (D / 8) + (512 / (D / 8)) r, so a key's row is read by adjacent
//     lanes (coalesced) and the K and V chunks of up to 8 rounds of keys (512 keys at D = 64; a
//     step at 32x32 has ~300) are loaded in one wave, before the softmax: the values wait on no
//     load after it. Partial dots meet by shuffles, the weighted V chunks by shuffles over the
//     lanes of a chunk and then over the warps in shared memory. (The previous version, a thread
//     per key for the scores and a warp per key for the values, waited on a load latency per 4
//     value rows of a warp: 14-17 us per layer on the H100.)
//   decode_kernel (any dtype and head dim): warps over keys with lanes over the head dim for
//     the scores, threads over the head dim for the values.
// sparse_decode_append gives both kernels this step's key and value (k_new, v_new): the block
// copies them into its cache row and reads that row from k_new / v_new, so no barrier orders the
// copy before the loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../../cuda_smem.h"
#include "../../env_switch.h"
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
  p.append<T>(b, h, g, threadIdx.x, kThreads);  // this step's row is read from k_new / v_new below

  for (int64_t j = warp; j < n; j += kWarpsPerBlock) {
    const int64_t key = p.key(j, g);
    if (lane == 0) rows[j] = static_cast<int32_t>(key);
    float s = 0.f;
    if (key >= 0) {
      const T* k = p.k_row<T>(b, h, key, g);
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
      if (w != 0.f) acc += w * to_acc(p.v_row<T>(b, h, rows[j], g)[d]);
    }
    out[d] = Store<T>::from(acc * inv);
  }
}

constexpr int kFastWarps = 16;
constexpr int kFastThreads = kFastWarps * kWarp;

// Eight 16-bit values of one 16-byte word as floats.
template <class T>
__device__ __forceinline__ void unpack8(const uint4& w, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_acc(e[i]);
}

template <class T, int HD>
__global__ void __launch_bounds__(kFastThreads) decode_fast_kernel(const DecodeParams p) {
  constexpr int kChunks = HD / 8;                  // 16-byte chunks of a row: lanes per key
  constexpr int kSlots = kFastThreads / kChunks;   // keys per round
  constexpr int kRounds = 8;                       // rounds whose loads are in flight together
  constexpr int kGroup = kSlots * kRounds;         // keys per group: 1024, 512, 256 for HD 32, 64, 128
  extern __shared__ float scores[];  // [num_keys], then the keys' rows as int32 [num_keys]
  __shared__ float partial[kFastWarps][HD];
  __shared__ float scratch[kFastWarps];
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int chunk = static_cast<int>(threadIdx.x) % kChunks, slot = static_cast<int>(threadIdx.x) / kChunks;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int64_t g = *p.g;
  const int n = static_cast<int>(p.num_keys());
  const float scale = static_cast<float>(p.scale);
  const float ninf = neg_inf(0.f);
  int32_t* const rows = reinterpret_cast<int32_t*>(scores + n);
  p.append<T>(b, h, g, threadIdx.x, kFastThreads);  // this step's row is read from k_new / v_new below

  float qv[8];
  const T* q = p.q_row<T>(b, h) + chunk * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) qv[i] = to_acc(q[i]);

  // Scores. Thread (slot, chunk) takes chunk `chunk` of keys j = slot + kSlots r: the K (and, in
  // the first group, V) chunks of kRounds keys are loaded at once, the chunks' partial dots met
  // by shuffles over the kChunks adjacent lanes of a key. An idle slot (past the last key) or a
  // masked key loads nothing: its chunks are zero, its score -inf and its weight 0.
  uint4 v0[kRounds];  // the first group's V chunks, loaded with its K chunks
  for (int base = 0; base < n; base += kGroup) {
    int32_t row[kRounds];
    uint4 kw[kRounds];
    int64_t off[kRounds];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {  // the image keys' offsets first, their loads in flight together
      const int j = base + slot + kSlots * r;
      off[r] = j >= p.text_len && j < n ? p.offsets[j - p.text_len] : 0;
    }
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int j = base + slot + kSlots * r;
      const int64_t key = j < n ? p.key_at(j, g, off[r]) : -1;
      row[r] = key >= 0 ? static_cast<int32_t>(key) : -1;
      kw[r] = row[r] >= 0 ? reinterpret_cast<const uint4*>(p.k_row<T>(b, h, row[r], g))[chunk] : uint4{};
      if (base == 0) v0[r] = row[r] >= 0 ? reinterpret_cast<const uint4*>(p.v_row<T>(b, h, row[r], g))[chunk] : uint4{};
    }
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      float k8[8];
      unpack8<T>(kw[r], k8);
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s = fmaf(qv[i], k8[i], s);
#pragma unroll
      for (int off = 1; off < kChunks; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      const int j = base + slot + kSlots * r;
      if (chunk == 0 && j < n) {
        scores[j] = row[r] >= 0 ? s * scale : ninf;
        rows[j] = row[r];
      }
    }
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

  // Values: the same keys per thread, weights from shared memory, V chunks from the registers
  // (first group) or loaded kRounds at once (later groups), none for an idle slot or masked key.
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int base = 0; base < n; base += kGroup) {
    uint4 vw[kRounds];
    float w[kRounds];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int j = base + slot + kSlots * r;
      w[r] = j < n ? scores[j] : 0.f;
      if (base == 0) {
        vw[r] = v0[r];
      } else {
        const int32_t at = j < n ? rows[j] : -1;
        vw[r] = at >= 0 ? reinterpret_cast<const uint4*>(p.v_row<T>(b, h, at, g))[chunk] : uint4{};
      }
    }
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      float v8[8];
      unpack8<T>(vw[r], v8);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w[r] != 0.f ? w[r] * v8[i] : 0.f;  // weight 0 adds 0, even to an inf value
    }
  }
  // Sum over the keys: the lanes of a warp with the same chunk, then the warps.
#pragma unroll
  for (int off = kChunks; off < kWarp; off <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
  }
  if (static_cast<int>(threadIdx.x) % kWarp < kChunks) {
#pragma unroll
    for (int i = 0; i < 8; ++i) partial[warp][chunk * 8 + i] = acc[i];
  }
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
  if (const char* err = allow_dynamic_smem<Kernel>(smem)) {  // the kernels have static arrays too
    // 8 bytes per key: about 28,000 keys fit an H100's 227 KiB per block, 11,600 sm_86/89's 99 KiB
    thread_local std::string message;
    message = std::string(err) + " (" + std::to_string(p.num_keys()) + " keys need " + std::to_string(smem) +
              " bytes of shared memory, more than this GPU gives a block; the reference backend takes any number)";
    return message.c_str();
  }
  Kernel<<<static_cast<unsigned int>(p.batch * p.heads), kBlock, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// DALLE_FAST_DECODE_FAST=0 in the environment keeps every call on decode_kernel (to time or to
// rule out the fast kernel without a rebuild); read at every call, so a benchmark can compare both
// in one process (a captured graph keeps the kernel chosen at capture).
bool fast_kernel_enabled() { return !env_is("DALLE_FAST_DECODE_FAST", "0"); }

template <class T>
const char* launch(const DecodeParams& p, cudaStream_t stream) {
  const int64_t blocks = p.batch * p.heads;
  if (blocks == 0 || p.dim == 0) return nullptr;
  if (blocks > int64_t(0x7fffffff)) return "sparse_decode: too many (batch, head) pairs for one launch";
  if (p.seq > int64_t(0x7fffffff)) return "sparse_decode: sequence too long for 32-bit key rows";
  if constexpr (sizeof(T) == 2) {
    // q and out are read and written by element; k_new / v_new rows by 16 bytes, as the caches'
    // (a null k_new / v_new passes)
    const bool fast = fast_kernel_enabled() && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_new) &&
                      aligned16(p.v_new);
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
