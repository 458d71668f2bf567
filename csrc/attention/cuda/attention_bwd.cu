// CUDA sparse-attention backward, first simple version, in three gather kernels so that no two
// warps write the same row (no atomics):
//   delta: one warp per query row, delta = rowsum(dout * out);
//   dq:    one warp per query, over the keys it sees (for_each_key_run);
//   dk/dv: one warp per key, over the queries that see it (for_each_query_run).
// Both recompute P = exp(scale q.k - lse) and dS = P (dP - delta) with dP = dout.v, then
//   dq = scale sum_k dS k,   dk = scale sum_q dS q,   dv = sum_q P dout.
// As in the forward, lanes stride over the head dim, each lane keeps R output dims per pass,
// and D > 32 R takes several passes (recomputing the scores).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../../masks.h"
#include "../params.h"
#include "attention_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace detail;

template <class T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const AttnParams p) {
  using A = typename Acc<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t D = p.dim, N = p.seq;
  const int64_t rows = p.batch * p.heads * N;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < rows; row += stride) {
    const int64_t n = row % N, bh = row / N;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* g = p.dout.row<const T>(b, h, n);
    const T* o = p.out.row<const T>(b, h, n);
    A acc = A(0);
    for (int64_t d = lane; d < D; d += kWarp) acc += to_acc(g[d]) * to_acc(o[d]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta.at<A>(b, h)[n] = acc;
  }
}

// For query row n and key row kp: P and dS (identical in every lane).
template <class T, class A>
__device__ __forceinline__ void probs_and_dscore(const T* q, const T* kr, const T* g, const T* vr, int64_t D,
                                                 int lane, A scale, A lse, A delta, A& pr, A& ds) {
  A s = A(0), dp = A(0);
  for (int64_t d = lane; d < D; d += kWarp) {
    s += to_acc(q[d]) * to_acc(kr[d]);
    dp += to_acc(g[d]) * to_acc(vr[d]);
  }
  s = warp_sum(s);
  dp = warp_sum(dp);
  pr = acc_exp(s * scale - lse);
  ds = pr * (dp - delta);
}

template <class T, int R>
__global__ void __launch_bounds__(kThreads) dq_kernel(const AttnParams p) {
  using A = typename Acc<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t D = p.dim, N = p.seq;
  const int64_t rows = p.batch * p.heads * N;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  const A scale = static_cast<A>(p.scale);

  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < rows; row += stride) {
    const int64_t n = row % N, bh = row / N;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* q = p.q.row<const T>(b, h, n);
    const T* g = p.dout.row<const T>(b, h, n);
    const A lse = p.lse.at<const A>(b, h)[n];
    const A delta = p.delta.at<const A>(b, h)[n];
    T* dq = p.dq.row<T>(b, h, n);

    for (int64_t d0 = 0; d0 < D; d0 += kWarp * R) {
      A acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = A(0);

      for_each_key_run(p.mask, n, [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t kp = lo; kp < hi; kp += step) {
          const T* kr = p.k.row<const T>(b, h, kp);
          const T* vr = p.v.row<const T>(b, h, kp);
          A pr, ds;
          probs_and_dscore<T, A>(q, kr, g, vr, D, lane, scale, lse, delta, pr, ds);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t d = d0 + lane + int64_t(kWarp) * r;
            if (d < D) acc[r] += ds * to_acc(kr[d]);
          }
        }
      });

#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t d = d0 + lane + int64_t(kWarp) * r;
        if (d < D) dq[d] = Store<T>::from(acc[r] * scale);
      }
    }
  }
}

template <class T, int R>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const AttnParams p) {
  using A = typename Acc<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t D = p.dim, N = p.seq;
  const int64_t rows = p.batch * p.heads * N;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  const A scale = static_cast<A>(p.scale);

  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < rows; row += stride) {
    const int64_t n = row % N, bh = row / N;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* kr = p.k.row<const T>(b, h, n);
    const T* vr = p.v.row<const T>(b, h, n);
    const A* lse = p.lse.at<const A>(b, h);
    const A* delta = p.delta.at<const A>(b, h);
    T* dk = p.dk.row<T>(b, h, n);
    T* dv = p.dv.row<T>(b, h, n);

    for (int64_t d0 = 0; d0 < D; d0 += kWarp * R) {
      A acc_k[R], acc_v[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc_k[r] = acc_v[r] = A(0);

      for_each_query_run(p.mask, n, [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t qp = lo; qp < hi; qp += step) {
          const T* q = p.q.row<const T>(b, h, qp);
          const T* g = p.dout.row<const T>(b, h, qp);
          A pr, ds;
          probs_and_dscore<T, A>(q, kr, g, vr, D, lane, scale, lse[qp], delta[qp], pr, ds);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t d = d0 + lane + int64_t(kWarp) * r;
            if (d < D) {
              acc_k[r] += ds * to_acc(q[d]);
              acc_v[r] += pr * to_acc(g[d]);
            }
          }
        }
      });

#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t d = d0 + lane + int64_t(kWarp) * r;
        if (d < D) {
          dk[d] = Store<T>::from(acc_k[r] * scale);
          dv[d] = Store<T>::from(acc_v[r]);
        }
      }
    }
  }
}

template <class T, int R>
cudaError_t launch_grads(const AttnParams& p, dim3 grid, dim3 block, cudaStream_t stream) {
  dq_kernel<T, R><<<grid, block, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dkv_kernel<T, R><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <class T>
const char* launch_delta(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.seq;
  if (rows == 0 || p.dim == 0) return nullptr;
  const dim3 grid(grid_for_rows(rows)), block(kThreads);
  delta_kernel<T><<<grid, block, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return nullptr;
}

template <class T>
const char* launch(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.seq;
  if (rows == 0 || p.dim == 0) return nullptr;
  if (const char* msg = launch_delta<T>(p, stream)) return msg;
  const dim3 grid(grid_for_rows(rows)), block(kThreads);
  cudaError_t err = cudaSuccess;
  switch (dims_per_lane(p.dim)) {
    case 1:
      err = launch_grads<T, 1>(p, grid, block, stream);
      break;
    case 2:
      err = launch_grads<T, 2>(p, grid, block, stream);
      break;
    case 4:
      err = launch_grads<T, 4>(p, grid, block, stream);
      break;
    default:
      err = launch_grads<T, 8>(p, grid, block, stream);
      break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* attention_delta(const AttnParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch_delta<float>(p, stream);
    case DType::Float64:
      return launch_delta<double>(p, stream);
    case DType::Float16:
      return launch_delta<__half>(p, stream);
    case DType::BFloat16:
      return launch_delta<__nv_bfloat16>(p, stream);
  }
  return "sparse_attention_bwd: unknown dtype tag";
}

const char* attention_backward(const AttnParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch<float>(p, stream);
    case DType::Float64:
      return launch<double>(p, stream);
    case DType::Float16:
      return launch<__half>(p, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(p, stream);
  }
  return "sparse_attention_bwd: unknown dtype tag";
}

}  // namespace dalle_fast::cuda
