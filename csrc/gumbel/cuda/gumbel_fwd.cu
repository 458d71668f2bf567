// CUDA fused Gumbel-softmax forward and the noise kernel.
//
// Forward: a block owns a tile of positions and each position's vocabulary is split over
// `splits` threads (gumbel_cuda.h: Layout). Two sweeps over the vocabulary:
//   1. load x, draw g (Philox, 4 entries per call), u = x + g: an online softmax normaliser of
//      u / tau (soft; gumbel_cuda.h: Soft) or the first argmax of u (hard), and the KL
//      statistics of x; the splits' statistics are combined by warp shuffles / shared memory.
//   2. soft: reload x, redraw the same g, write y = exp((u - max) / tau) / sum; hard: write the
//      one-hot (no loads, no noise); the Gumbel-max draw (kIndex, gumbel_argmax): no sweep 2,
//      the first argmax of fma(x, scale, g) is the output.
// The noise is never stored; sweep 2 recomputes it. gumbel_forward first offers the call to the
// one-read cluster kernel (gumbel_fwd_resident.cu), which takes soft samples of strided
// vocabularies up to 16384 entries on sm_90; everything else runs here.
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

struct FwdStats {
  Soft soft;
  ArgMax am;
  Kl kl;
};

__device__ __forceinline__ FwdStats shfl_xor(const FwdStats& a, int off) {
  return {gumbel_detail::shfl_xor(a.soft, off), gumbel_detail::shfl_xor(a.am, off),
          gumbel_detail::shfl_xor(a.kl, off)};
}

struct FwdMerge {
  float f;  // 1 / tau
  __device__ __forceinline__ FwdStats operator()(const FwdStats& a, const FwdStats& b) const {
    return {soft_merge(a.soft, b.soft, f), argmax_merge(a.am, b.am), kl_merge(a.kl, b.kl)};
  }
};

// `factor`: 1 / tau, or the scale of the Gumbel-max draw (kIndex, which implies kHard).
template <class T, bool kSplitFast, bool kVec, bool kHard, bool kKl, bool kIndex = false>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const GumbelParams p, int splits, float factor) {
  static_assert(!kIndex || (kHard && !kKl), "the Gumbel-max draw is a hard sample without the KL term");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FwdStats* smem = reinterpret_cast<FwdStats*>(smem_raw);
  const Layout l = thread_layout<kSplitFast>(splits);
  const SeedOffset so = take_seed_offset(p);

  const int64_t V = p.vocab, inner = p.inner, positions = p.outer * p.inner, J = (V + 3) / 4;
  const T* logits = static_cast<const T*>(p.logits);
  T* y = static_cast<T*>(p.y);
  const int64_t tiles = (positions + l.tile - 1) / l.tile;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t pos = tile * l.tile + l.lane;
    const bool valid = pos < positions;
    const int64_t base = valid ? (pos / inner) * V * inner + pos % inner : 0;

    // Sweep 1: statistics.
    FwdStats st{soft_identity(), argmax_identity(), kl_identity()};
    if (valid) {
      for (int64_t j = l.split; j < J; j += l.splits) {
        const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
        float x[4], g[4];
        load4<kVec>(logits + base + 4 * j * inner, inner, n, x);
        gumbel4(so.seed, so.offset, pos, j, g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k < n) {
            const float u = kIndex ? __fmaf_rn(x[k], factor, g[k]) : __fadd_rn(x[k], g[k]);
            if constexpr (kHard) {
              argmax_add(st.am, u, 4 * j + k);
            } else {
              soft_add(st.soft, u, 0.0f, factor);
            }
            if constexpr (kKl) kl_add(st.kl, x[k]);
          }
        }
      }
    }
    st = reduce_splits<kSplitFast>(st, l, smem, FwdMerge{factor});

    if (valid) {
      if (kKl && l.split == 0) {
        static_cast<T*>(p.kl)[pos] = from_float<T>(kl_to_uniform(st.kl, V));
      }
      // Sweep 2: the sample.
      if constexpr (kIndex) {
        if (l.split == 0) p.index[pos] = st.am.idx;
      } else if constexpr (kHard) {
        for (int64_t j = l.split; j < J; j += l.splits) {
          const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
          float out[4];
          // a NaN score makes the position NaN throughout, as the straight-through y_hard - y + y
          const bool nan = st.am.best != st.am.best;
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = nan ? st.am.best : 4 * j + k == st.am.idx ? 1.0f : 0.0f;
          store4<kVec>(y + base + 4 * j * inner, inner, n, out);
        }
      } else {
        const float inv_s = inverse_sum(st.soft.s);
        for (int64_t j = l.split; j < J; j += l.splits) {
          const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
          float x[4], g[4], out[4];
          load4<kVec>(logits + base + 4 * j * inner, inner, n, x);
          gumbel4(so.seed, so.offset, pos, j, g);
#pragma unroll
          for (int k = 0; k < 4; ++k) out[k] = soft_value(st.soft, __fadd_rn(x[k], g[k]), factor, inv_s);
          store4<kVec>(y + base + 4 * j * inner, inner, n, out);
        }
      }
    }
    __syncthreads();  // the next tile reuses smem
  }
}

// One thread per (position, block of 4 entries); consecutive threads take consecutive positions
// of one vocabulary row (inner > 1) or consecutive blocks of one row (inner == 1).
__global__ void __launch_bounds__(256) noise_kernel(int64_t outer, int64_t V, int64_t inner, PhiloxSource rng,
                                                    float* out) {
  const SeedOffset so = unpack(rng);
  const int64_t J = (V + 3) / 4, total = outer * J * inner;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % inner, oj = idx / inner;
    const int64_t j = oj % J, o = oj / J;
    float g[4];
    gumbel4(so.seed, so.offset, o * inner + i, j, g);
    float* dst = out + (o * V + 4 * j) * inner + i;
    const int n = V - 4 * j < 4 ? static_cast<int>(V - 4 * j) : 4;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < n) dst[k * inner] = g[k];
  }
}

template <class T, bool kHard, bool kKl, bool kIndex = false>
void launch_forward_as(const GumbelParams& p, const LaunchConfig& c, bool vec, float factor, cudaStream_t stream) {
  const size_t smem = c.smem_entries * sizeof(FwdStats);
  if (!c.split_fast) {
    forward_kernel<T, false, false, kHard, kKl, kIndex><<<c.grid, c.threads, smem, stream>>>(p, c.splits, factor);
  } else if (vec) {
    forward_kernel<T, true, true, kHard, kKl, kIndex><<<c.grid, c.threads, smem, stream>>>(p, c.splits, factor);
  } else {
    forward_kernel<T, true, false, kHard, kKl, kIndex><<<c.grid, c.threads, smem, stream>>>(p, c.splits, factor);
  }
}

template <class T>
const char* launch_forward(const GumbelParams& p, cudaStream_t stream) {
  const LaunchConfig c = make_config(p);
  const float inv_tau = 1.0f / p.tau;
  const bool vec = c.split_fast && p.vocab % 4 == 0 && aligned_for_vec(p.logits, sizeof(T)) &&
                   (p.index != nullptr || aligned_for_vec(p.y, sizeof(T)));
  if (p.index != nullptr) {
    launch_forward_as<T, true, false, true>(p, c, vec, p.scale, stream);
  } else if (p.hard) {
    if (p.with_kl) {
      launch_forward_as<T, true, true>(p, c, vec, inv_tau, stream);
    } else {
      launch_forward_as<T, true, false>(p, c, vec, inv_tau, stream);
    }
  } else if (p.with_kl) {
    launch_forward_as<T, false, true>(p, c, vec, inv_tau, stream);
  } else {
    launch_forward_as<T, false, false>(p, c, vec, inv_tau, stream);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* gumbel_forward(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream) {
  if (p.outer * p.inner == 0 || p.vocab == 0) return nullptr;
  if (p.logits == nullptr || (p.y == nullptr && p.index == nullptr) || p.rng_state == nullptr ||
      (p.with_kl && p.kl == nullptr))
    return "gumbel_softmax_fwd: missing buffer";
  if (p.index != nullptr && (p.with_kl || !p.hard)) return "gumbel_argmax: a hard draw without the KL term";
  if (!(p.tau > 0.0f) || !(p.scale > 0.0f)) return "gumbel_softmax_fwd: tau and scale must be positive";
  const char* err = nullptr;
  if (gumbel_forward_resident(p, dtype, stream, &err)) return err;
  switch (dtype) {
    case GumbelDType::Float32:
      return launch_forward<float>(p, stream);
    case GumbelDType::Float16:
      return launch_forward<__half>(p, stream);
    case GumbelDType::BFloat16:
      return launch_forward<__nv_bfloat16>(p, stream);
  }
  return "gumbel_softmax_fwd: unknown dtype tag";
}

const char* gumbel_noise(const GumbelParams& p, float* out, cudaStream_t stream) {
  const int64_t J = (p.vocab + 3) / 4, total = p.outer * J * p.inner;
  if (total == 0) return nullptr;
  if (out == nullptr || p.rng_in == nullptr) return "gumbel_noise: missing buffer";
  PhiloxSource rng;
  rng.seed_ptr = p.rng_in;
  rng.offset_ptr = p.rng_in + 1;
  int64_t blocks = (total + 255) / 256;
  const int64_t cap = int64_t(1) << 30;
  if (blocks > cap) blocks = cap;
  noise_kernel<<<static_cast<unsigned int>(blocks), 256, 0, stream>>>(p.outer, p.vocab, p.inner, rng, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace dalle_fast::cuda
