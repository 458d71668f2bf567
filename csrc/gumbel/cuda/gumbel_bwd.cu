// CUDA fused Gumbel-softmax backward, same thread layout as the forward (gumbel_cuda.h):
//   grad_v = y_v (dy_v - sum_u y_u dy_u) / tau
//          + gkl p_v (log p_v - sum_u p_u log p_u)      (when grad_kl is given; p = softmax(x))
// with y the saved soft sample, or (hard forward) the soft sample recomputed from the logits and
// the forward's noise. Two sweeps:
//   1. sum y dy (saved y), or the online normaliser of u = x + g at 1 / tau together with
//      sum exp((u - m) / tau) dy (recomputed y; gumbel_cuda.h: Soft), and the KL statistics of x;
//      combined across the splits.
//   2. reload, recompute y where needed, write grad_logits.
// gumbel_backward first offers the call to the one-read cluster kernel (gumbel_bwd_resident.cu),
// which takes a soft forward's backward for strided vocabularies (up to 16384 entries, 8192
// with the KL term) on sm_90.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../../philox.h"
#include "../gumbel_params.h"
#include "gumbel_cuda.h"

namespace dalle_fast::cuda {

namespace {

using namespace gumbel_detail;

struct BwdStats {
  Soft soft;  // recomputed y: normaliser of u, d = sum exp((u - m) / tau) dy
  float dot;  // saved y: sum y dy
  Kl kl;
};

__device__ __forceinline__ BwdStats shfl_xor(const BwdStats& a, int off) {
  return {gumbel_detail::shfl_xor(a.soft, off), gumbel_detail::shfl_xor(a.dot, off),
          gumbel_detail::shfl_xor(a.kl, off)};
}

struct BwdMerge {
  float f;  // 1 / tau
  __device__ __forceinline__ BwdStats operator()(const BwdStats& a, const BwdStats& b) const {
    return {soft_merge(a.soft, b.soft, f), __fadd_rn(a.dot, b.dot), kl_merge(a.kl, b.kl)};
  }
};

template <class T, bool kSplitFast, bool kVec, bool kSaved, bool kKl>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(const GumbelParams p, int splits, float inv_tau) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdStats* smem = reinterpret_cast<BwdStats*>(smem_raw);
  const Layout l = thread_layout<kSplitFast>(splits);

  const int64_t V = p.vocab, inner = p.inner, positions = p.outer * p.inner, J = (V + 3) / 4;
  const T* logits = static_cast<const T*>(p.logits);
  const T* dy_ptr = static_cast<const T*>(p.grad_y);
  const T* ys_ptr = static_cast<const T*>(p.y_soft);
  const T* gkl_ptr = static_cast<const T*>(p.grad_kl);
  T* grad = static_cast<T*>(p.grad_logits);
  constexpr bool saved = kSaved, with_kl = kKl;
  SeedOffset so{0, 0};
  if constexpr (!saved) {
    PhiloxSource src;
    src.seed_ptr = p.rng_in;
    src.offset_ptr = p.rng_in + 1;
    so = unpack(src);
  }
  const int64_t tiles = (positions + l.tile - 1) / l.tile;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t pos = tile * l.tile + l.lane;
    const bool valid = pos < positions;
    const int64_t base = valid ? (pos / inner) * V * inner + pos % inner : 0;

    // Sweep 1: statistics.
    BwdStats st{soft_identity(), 0.0f, kl_identity()};
    if (valid) {
      for (int64_t j = l.split; j < J; j += l.splits) {
        const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
        const int64_t at = base + 4 * j * inner;
        float dy[4], x[4];
        load4<kVec>(dy_ptr + at, inner, n, dy);
        if constexpr (saved) {
          float ys[4];
          load4<kVec>(ys_ptr + at, inner, n, ys);
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (k < n) st.dot += ys[k] * dy[k];
        }
        if constexpr (!saved || with_kl) load4<kVec>(logits + at, inner, n, x);
        if constexpr (!saved) {
          float g[4];
          gumbel4(so.seed, so.offset, pos, j, g);
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (k < n) soft_add(st.soft, __fadd_rn(x[k], g[k]), dy[k], inv_tau);
        }
        if constexpr (with_kl) {
#pragma unroll
          for (int k = 0; k < 4; ++k)
            if (k < n) kl_add(st.kl, x[k]);
        }
      }
    }
    st = reduce_splits<kSplitFast>(st, l, smem, BwdMerge{inv_tau});

    // Sweep 2: the gradient.
    if (valid) {
      // s == 0 only for a position whose logits are all -inf: y = 0 there, and so is the gradient;
      // s is NaN for one with a NaN logit: so are y and the gradient.
      const float inv_s = inverse_sum(st.soft.s);
      const float dot = kSaved ? st.dot : st.soft.d * inv_s;
      KlGrad klg;
      if constexpr (with_kl) klg = KlGrad(st.kl, to_float(gkl_ptr[pos]));
      for (int64_t j = l.split; j < J; j += l.splits) {
        const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
        const int64_t at = base + 4 * j * inner;
        float dy[4], ys[4], x[4], out[4];
        load4<kVec>(dy_ptr + at, inner, n, dy);
        if constexpr (!saved || with_kl) load4<kVec>(logits + at, inner, n, x);
        if constexpr (saved) {
          load4<kVec>(ys_ptr + at, inner, n, ys);
        } else {
          float g[4];
          gumbel4(so.seed, so.offset, pos, j, g);
#pragma unroll
          for (int k = 0; k < 4; ++k) ys[k] = soft_value(st.soft, __fadd_rn(x[k], g[k]), inv_tau, inv_s);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float gv = ys[k] * (dy[k] - dot) * inv_tau;
          if constexpr (with_kl) gv += klg.at(x[k]);
          out[k] = gv;
        }
        store4<kVec>(grad + at, inner, n, out);
      }
    }
    __syncthreads();  // the next tile reuses smem
  }
}

template <class T, bool kSaved, bool kKl>
void launch_backward_as(const GumbelParams& p, const LaunchConfig& c, bool vec, float inv_tau, cudaStream_t stream) {
  const size_t smem = c.smem_entries * sizeof(BwdStats);
  if (!c.split_fast) {
    backward_kernel<T, false, false, kSaved, kKl><<<c.grid, c.threads, smem, stream>>>(p, c.splits, inv_tau);
  } else if (vec) {
    backward_kernel<T, true, true, kSaved, kKl><<<c.grid, c.threads, smem, stream>>>(p, c.splits, inv_tau);
  } else {
    backward_kernel<T, true, false, kSaved, kKl><<<c.grid, c.threads, smem, stream>>>(p, c.splits, inv_tau);
  }
}

template <class T>
const char* launch_backward(const GumbelParams& p, cudaStream_t stream) {
  const LaunchConfig c = make_config(p);
  const float inv_tau = 1.0f / p.tau;
  const bool vec = c.split_fast && p.vocab % 4 == 0 && aligned_for_vec(p.logits, sizeof(T)) &&
                   aligned_for_vec(p.grad_y, sizeof(T)) && aligned_for_vec(p.y_soft, sizeof(T)) &&
                   aligned_for_vec(p.grad_logits, sizeof(T));
  const bool saved = p.y_soft != nullptr, with_kl = p.grad_kl != nullptr;
  if (saved) {
    if (with_kl) {
      launch_backward_as<T, true, true>(p, c, vec, inv_tau, stream);
    } else {
      launch_backward_as<T, true, false>(p, c, vec, inv_tau, stream);
    }
  } else if (with_kl) {
    launch_backward_as<T, false, true>(p, c, vec, inv_tau, stream);
  } else {
    launch_backward_as<T, false, false>(p, c, vec, inv_tau, stream);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* gumbel_backward(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream) {
  if (p.outer * p.inner == 0 || p.vocab == 0) return nullptr;
  if (p.logits == nullptr || p.grad_y == nullptr || p.grad_logits == nullptr ||
      (p.y_soft == nullptr && p.rng_in == nullptr))
    return "gumbel_softmax_bwd: missing buffer";
  if (!(p.tau > 0.0f)) return "gumbel_softmax_bwd: tau must be positive";
  const char* err = nullptr;
  if (gumbel_backward_resident(p, dtype, stream, &err)) return err;
  switch (dtype) {
    case GumbelDType::Float32:
      return launch_backward<float>(p, stream);
    case GumbelDType::Float16:
      return launch_backward<__half>(p, stream);
    case GumbelDType::BFloat16:
      return launch_backward<__nv_bfloat16>(p, stream);
  }
  return "gumbel_softmax_bwd: unknown dtype tag";
}

}  // namespace dalle_fast::cuda
