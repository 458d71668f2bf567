// CUDA sparse-attention forward, first simple version: one warp per (batch, head, query); the
// lanes stride over the head dim. The warp walks the query's allowed keys (for_each_key_run),
// one key at a time: a warp-shuffle dot product gives the score, an online softmax (running max
// m, running sum l) rescales the output accumulator. Saves lse = m + log(l) per query.
//
// Each lane keeps R output dims in registers (dims d0 + lane + 32 r); for D > 32 R the kernel
// makes several passes over the keys, one per 32 R output dims, recomputing the same scores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../../masks.h"
#include "../params.h"
#include "attention_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace detail;

template <class T, int R>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttnParams p) {
  using A = typename Acc<T>::type;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t D = p.dim, N = p.seq;
  const int64_t rows = p.batch * p.heads * N;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  const A scale = static_cast<A>(p.scale);
  const A ninf = neg_inf(A(0));

  for (int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < rows; row += stride) {
    const int64_t n = row % N, bh = row / N;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* q = p.q.row<const T>(b, h, n);
    T* o = p.out.row<T>(b, h, n);
    A m = ninf, l = A(0);

    for (int64_t d0 = 0; d0 < D; d0 += kWarp * R) {
      A acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = A(0);
      m = ninf;
      l = A(0);

      for_each_key_run(p.mask, n, [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t kp = lo; kp < hi; kp += step) {
          const T* kr = p.k.row<const T>(b, h, kp);
          A s = A(0);
          for (int64_t d = lane; d < D; d += kWarp) s += to_acc(q[d]) * to_acc(kr[d]);
          s = warp_sum(s) * scale;

          const A mnew = s > m ? s : m;
          // Guards keep -inf scores (from infinite inputs) from producing exp(-inf - -inf) = nan.
          const A alpha = m == ninf ? A(0) : acc_exp(m - mnew);
          const A pr = s == ninf ? A(0) : acc_exp(s - mnew);
          l = l * alpha + pr;
          m = mnew;

          const T* vr = p.v.row<const T>(b, h, kp);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int64_t d = d0 + lane + int64_t(kWarp) * r;
            if (d < D) acc[r] = acc[r] * alpha + pr * to_acc(vr[d]);
          }
        }
      });

      // Every query sees at least itself, so l > 0 for finite inputs.
      const A inv = A(1) / l;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t d = d0 + lane + int64_t(kWarp) * r;
        if (d < D) o[d] = Store<T>::from(acc[r] * inv);
      }
    }
    if (lane == 0) p.lse.at<A>(b, h)[n] = m + acc_log(l);
  }
}

template <class T>
const char* launch(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.seq;
  if (rows == 0 || p.dim == 0) return nullptr;
  const dim3 grid(grid_for_rows(rows)), block(kThreads);
  switch (dims_per_lane(p.dim)) {
    case 1:
      forward_kernel<T, 1><<<grid, block, 0, stream>>>(p);
      break;
    case 2:
      forward_kernel<T, 2><<<grid, block, 0, stream>>>(p);
      break;
    case 4:
      forward_kernel<T, 4><<<grid, block, 0, stream>>>(p);
      break;
    default:
      forward_kernel<T, 8><<<grid, block, 0, stream>>>(p);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* attention_forward(const AttnParams& p, DType dtype, cudaStream_t stream) {
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
  return "sparse_attention_fwd: unknown dtype tag";
}

}  // namespace dalle_fast::cuda
