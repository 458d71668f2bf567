// CUDA fused Gumbel-softmax launchers: plain GumbelParams in, no torch types, so the .cu files
// stay free of ATen headers. gumbel_cuda.cpp validates the tensors, takes the Philox state from
// the CUDA generator and calls these.
//
// Storage dtypes: float, __half, __nv_bfloat16; all math in float. The noise of element
// (position, v) is philox::gumbel_bits(seed, offset, position, v / 4), lane v % 4, turned into
// g = -log(-log(u)) by philox::gumbel_from_bits, the same function (explicit fused
// multiply-adds) as the CPU kernels, so both draw bit-identical noise.
#pragma once

#include <cuda_runtime.h>

#include "../gumbel_params.h"

namespace dalle_fast::cuda {

// The logits' storage type (named apart from the attention launchers' DType).
enum class GumbelDType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Enqueues the forward on `stream`: fills p.y, p.kl (when p.with_kl), or p.index instead of
// both (the Gumbel-max draw, always the two-sweep kernel's first sweep), and p.rng_state (the
// (seed, offset) read from p.rng, written on the device by one thread). No host synchronisation.
// Returns nullptr on success, else a static error message (launch / configuration errors only;
// errors raised while the kernel runs surface at the next synchronising call, as usual).
const char* gumbel_forward(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream);

// The one-read kernels in the cluster layout of gumbel_cluster.h, which gumbel_forward and
// gumbel_backward try first: they return false when they do not apply (a hard sample, inner == 1,
// vocab over 16384 (8192 for the KL backward), a device before sm_90, too few clusters resident,
// or DALLE_FAST_GUMBEL_RESIDENT=0), else enqueue the kernel and set *err as those functions return.
// The forward takes soft samples (gumbel_fwd_resident.cu), the backward those of a soft forward,
// with y saved (gumbel_bwd_resident.cu).
bool gumbel_forward_resident(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream, const char** err);
bool gumbel_backward_resident(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream, const char** err);

// Enqueues the backward on `stream`: fills p.grad_logits from p.grad_y, p.grad_kl (optional),
// the soft sample p.y_soft or, when it is null, the one recomputed from p.logits and the noise of
// the (seed, offset) at p.rng_in (device memory). Same return convention as gumbel_forward.
const char* gumbel_backward(const GumbelParams& p, GumbelDType dtype, cudaStream_t stream);

// Enqueues the noise kernel: out, a contiguous float32 [outer, vocab, inner] tensor, gets g of
// every element for the (seed, offset) at p.rng_in (device memory). Uses p.outer, p.vocab,
// p.inner and p.rng_in only.
const char* gumbel_noise(const GumbelParams& p, float* out, cudaStream_t stream);

}  // namespace dalle_fast::cuda

// ---- Device helpers shared by gumbel_fwd.cu and gumbel_bwd.cu (nvcc only). ---------------
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../../philox.h"

namespace dalle_fast::cuda::gumbel_detail {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;  // largest block any launch uses (__launch_bounds__)

__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
constexpr float kLog2E = 1.4426950408889634f;
// 2^x by ex2.approx, with results below 2^-126 flushed to 0: without the flush each call also
// takes a range check and two rescaling multiplies. 2^-inf is 0. For the softmax's
// e = exp(z - max) <= 1, where a flushed e is below any sum's rounding.
__device__ __forceinline__ float exp2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
// exp(x) as __expf computes it (ex2.approx of x log2(e)), flushed as exp2_ftz.
__device__ __forceinline__ float exp_ftz(float x) { return exp2_ftz(x * kLog2E); }

// ---- Storage -------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Four consecutive elements, for vectorised access when vocab is contiguous.
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Elements v0 .. v0 + n - 1 (n <= 4) of a position: ptr[k * stride], k < n. kVec: stride is 1,
// n is 4 and ptr is aligned to 4 elements.
template <bool kVec, class T>
__device__ __forceinline__ void load4(const T* ptr, int64_t stride, int n, float (&out)[4]) {
  if constexpr (kVec) {
    const Vec4<T> w = *reinterpret_cast<const Vec4<T>*>(ptr);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_float(w.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = k < n ? to_float(ptr[k * stride]) : 0.0f;
  }
}

template <bool kVec, class T>
__device__ __forceinline__ void store4(T* ptr, int64_t stride, int n, const float (&in)[4]) {
  if constexpr (kVec) {
    Vec4<T> w;
#pragma unroll
    for (int k = 0; k < 4; ++k) w.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec4<T>*>(ptr) = w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < n) ptr[k * stride] = from_float<T>(in[k]);
  }
}

// ---- Noise ---------------------------------------------------------------------------------
// g = -log(-log(u)) from one 32-bit Philox output: philox::gumbel_from_bits, shared with the CPU.
using philox::gumbel_from_bits;

__device__ __forceinline__ void gumbel4(uint64_t seed, uint64_t offset, int64_t position, int64_t v4,
                                        float (&g)[4]) {
  const philox::U32x4 r =
      philox::gumbel_bits(seed, offset, static_cast<uint64_t>(position), static_cast<uint64_t>(v4));
  g[0] = gumbel_from_bits(r.x);
  g[1] = gumbel_from_bits(r.y);
  g[2] = gumbel_from_bits(r.z);
  g[3] = gumbel_from_bits(r.w);
}

// (seed, offset) of a PhiloxSource, read inside the kernel so that CUDA-graph capture stays
// valid (what at::cuda::philox::unpack does with a PhiloxCudaState).
struct SeedOffset {
  uint64_t seed, offset;
};
__device__ __forceinline__ SeedOffset unpack(const PhiloxSource& s) {
  if (s.seed_ptr != nullptr)
    return {static_cast<uint64_t>(*s.seed_ptr), static_cast<uint64_t>(*s.offset_ptr) + s.offset_extra};
  return {s.seed, s.offset};
}

// The forward's (seed, offset), which thread 0 of block 0 also records in p.rng_state for the
// backward and gumbel_noise.
__device__ __forceinline__ SeedOffset take_seed_offset(const GumbelParams& p) {
  const SeedOffset so = unpack(p.rng);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.rng_state[0] = static_cast<int64_t>(so.seed);
    p.rng_state[1] = static_cast<int64_t>(so.offset);
  }
  return so;
}

// ---- Online statistics ---------------------------------------------------------------------
// A softmax normaliser over one position's scores u = x + g at the factor f = 1 / tau: max m of
// u and s = sum exp((u - m) f), plus d = sum exp((u - m) f) w for weights w (the backward's
// sum y * dy). -inf scores contribute 0. The max is taken before scaling, so that no finite
// logit overflows: (x + g) / tau itself passes FLT_MAX for |x| > FLT_MAX tau. A NaN score is
// never the max, but its exp makes s NaN, and every merge keeps it NaN: its position's sample is
// NaN throughout (inverse_sum, soft_value), as the reference's softmax.
struct Soft {
  float m, s, d;
};
__device__ __forceinline__ Soft soft_identity() { return {neg_inf(), 0.0f, 0.0f}; }
__device__ __forceinline__ void soft_add(Soft& a, float u, float w, float f) {
  if (u > a.m) {
    const float alpha = expf((a.m - u) * f);  // 0 while a.m is -inf
    a.s = a.s * alpha + 1.0f;
    a.d = a.d * alpha + w;
    a.m = u;
  } else if (u != neg_inf()) {
    const float e = expf((u - a.m) * f);
    a.s += e;
    a.d += e * w;
  }
}
// Combines two partial statistics; callers pass them in a fixed (split-index) order so that
// every thread of a position gets the same bits.
__device__ __forceinline__ Soft soft_merge(const Soft& a, const Soft& b, float f) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return {m, a.s + b.s, a.d + b.d};  // 0, or NaN from a NaN score
  const float ea = a.m == neg_inf() ? 0.0f : expf((a.m - m) * f);
  const float eb = b.m == neg_inf() ? 0.0f : expf((b.m - m) * f);
  return {m, __fadd_rn(__fmul_rn(a.s, ea), __fmul_rn(b.s, eb)), __fadd_rn(__fmul_rn(a.d, ea), __fmul_rn(b.d, eb))};
}
// 1 / s, or s itself where it is 0 (every score of the position -inf: its sample is 0) or NaN (a
// NaN score: its sample is NaN throughout).
__device__ __forceinline__ float inverse_sum(float s) { return s > 0.0f ? 1.0f / s : s; }
// The soft sample of score u from its position's total statistics and inv_s = inverse_sum(s):
// exp((u - m) f) / s, 0 for u = -inf (NaN where inv_s is).
__device__ __forceinline__ float soft_value(const Soft& a, float u, float f, float inv_s) {
  return u == neg_inf() ? 0.0f * inv_s : expf((u - a.m) * f) * inv_s;
}

// Statistics of p = softmax(x) for the KL term: max mx, sx = sum e_v, tx = sum e_v (x_v - mx) with
// e_v = exp(x_v - mx); e_v (x_v - mx) counts 0 where e_v is 0. Then sum p log p = tx / sx - log sx.
// A NaN logit makes sx NaN (its exp), which every merge keeps, and so the KL.
struct Kl {
  float mx, sx, tx;
};
__device__ __forceinline__ Kl kl_identity() { return {neg_inf(), 0.0f, 0.0f}; }
__device__ __forceinline__ void kl_add(Kl& a, float x) {
  if (x > a.mx) {
    // Rebase to the new max: e'_u = e_u alpha, x_u - x = (x_u - mx) + (mx - x).
    if (a.sx > 0.0f) {
      const float alpha = expf(a.mx - x);
      a.tx = alpha > 0.0f ? alpha * (a.tx + (a.mx - x) * a.sx) : 0.0f;
      a.sx = a.sx * alpha;
    }
    a.sx += 1.0f;  // the new max itself: e = 1, e (x - mx) = 0
    a.mx = x;
  } else if (x != neg_inf()) {
    const float d = x - a.mx;
    const float e = expf(d);
    a.sx += e;
    a.tx += e > 0.0f ? e * d : 0.0f;
  }
}
// A cheaper kl_add for values in quads: kl_add_quad raises the max once per quad, then adds each
// entry with one exponential and no branch. Differences below -100 are clamped: their exponential
// flushes to 0 either way, and the clamp keeps e (x - mx) at 0 for x = -inf.
__device__ __forceinline__ void kl_add_below_max(Kl& a, float x) {  // x <= a.mx, or NaN
  const float diff = x - (a.mx == neg_inf() ? 0.0f : a.mx);
  const float d = diff < -100.0f ? -100.0f : diff;  // not fmaxf, which would turn a NaN into -100
  const float e = exp_ftz(d);
  a.sx += e;
  a.tx = fmaf(e, d, a.tx);
}
__device__ __forceinline__ void kl_add_quad(Kl& a, const float (&x)[4]) {
  const float m = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
  if (m > a.mx) {
    // Rebase to the new max: e'_u = e_u alpha, x_u - m = (x_u - mx) + (mx - m).
    if (a.sx > 0.0f) {
      const float d = fmaxf(a.mx - m, -100.0f);
      const float alpha = exp_ftz(d);
      a.tx = alpha * fmaf(d, a.sx, a.tx);
      a.sx *= alpha;
    }
    a.mx = m;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) kl_add_below_max(a, x[k]);
}
__device__ __forceinline__ float kl_rebased_t(const Kl& a, float m, float alpha) {
  // a.tx rebased to max m with alpha = exp(a.mx - m) > 0.
  return __fmul_rn(alpha, __fadd_rn(a.tx, __fmul_rn(a.mx - m, a.sx)));
}
__device__ __forceinline__ Kl kl_merge(const Kl& a, const Kl& b) {
  const float m = fmaxf(a.mx, b.mx);
  if (m == neg_inf()) return {m, a.sx + b.sx, a.tx + b.tx};  // 0, or NaN from a NaN logit
  const float ea = a.sx > 0.0f ? expf(a.mx - m) : 0.0f;
  const float eb = b.sx > 0.0f ? expf(b.mx - m) : 0.0f;
  const float ta = ea > 0.0f ? kl_rebased_t(a, m, ea) : 0.0f;
  const float tb = eb > 0.0f ? kl_rebased_t(b, m, eb) : 0.0f;
  return {m, __fadd_rn(__fmul_rn(a.sx, ea), __fmul_rn(b.sx, eb)), __fadd_rn(ta, tb)};
}

// KL(p || uniform) over V entries from a position's total statistics: sum p log p + log V =
// tx / sx - log(sx / V). Written as logf(sx) - logf(V), the two ~log V terms cancelled to a few
// 1e-7 for near-uniform logits (KL ~1e-9) and came out negative; sx / V near 1 goes through
// log1pf of sx - V (exact there), so what is left is the rounding of the one-pass sums (~1e-7
// relative to sx), and the result is clamped at 0. The CPU kernel and the reference sum
// p log(p V) - p + 1/V term by term instead, which needs a second sweep over the logits (the
// one-read kernel has none); they agree with this to ~1e-7.
__device__ __forceinline__ float kl_to_uniform(const Kl& a, int64_t V) {
  const float v = static_cast<float>(V);
  const float ratio = a.sx / v;
  const float log_ratio = ratio > 0.5f ? log1pf((a.sx - v) / v) : logf(ratio);
  const float kl = a.tx / a.sx - log_ratio;
  return kl < 0.0f ? 0.0f : kl;  // NaN (every logit -inf) stays NaN
}

// The KL term's gradient at one entry x of a position, gkl p (log p - sum p log p), from the
// position's total statistics and its upstream gradient gkl. log p - sum p log p is taken as
// (x - mx) - tx / sx: the log of the sum drops out, instead of cancelling between two ~log V terms.
struct KlGrad {
  float gkl = 0.0f, mx = 0.0f, log_s = 0.0f, mean_d = 0.0f;
  KlGrad() = default;
  __device__ __forceinline__ KlGrad(const Kl& a, float g)
      : gkl(g), mx(a.mx), log_s(logf(a.sx)), mean_d(a.tx / a.sx) {}
  __device__ __forceinline__ float at(float x) const {
    const float d = x - mx;
    const float pv = expf(d - log_s);
    return pv > 0.0f ? gkl * pv * (d - mean_d) : 0.0f;
  }
};

// First index of the maximum (ties: the smaller index; all -inf: index 0; NaN above any number,
// the first NaN winning: as torch.argmax).
struct ArgMax {
  float best;
  int64_t idx;
};
__device__ __forceinline__ ArgMax argmax_identity() { return {neg_inf(), INT64_MAX}; }
// Whether (z, v) comes before (best, idx).
__device__ __forceinline__ bool argmax_before(float z, int64_t v, float best, int64_t idx) {
  const bool z_nan = z != z, best_nan = best != best;
  if (z_nan || best_nan) return z_nan && (!best_nan || v < idx);
  return z > best || (z == best && v < idx);
}
__device__ __forceinline__ void argmax_add(ArgMax& a, float z, int64_t v) {
  // Within a thread v grows, so ties keep the earlier index; the first -inf replaces the identity.
  if (argmax_before(z, v, a.best, a.idx)) {
    a.best = z;
    a.idx = v;
  }
}
__device__ __forceinline__ ArgMax argmax_merge(const ArgMax& a, const ArgMax& b) {
  return argmax_before(b.best, b.idx, a.best, a.idx) ? b : a;
}

// ---- Warp shuffles of the statistics --------------------------------------------------------
__device__ __forceinline__ float shfl_xor(float x, int off) { return __shfl_xor_sync(0xffffffffu, x, off); }
__device__ __forceinline__ int64_t shfl_xor(int64_t x, int off) {
  return static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(x), off));
}
__device__ __forceinline__ Soft shfl_xor(const Soft& a, int off) {
  return {shfl_xor(a.m, off), shfl_xor(a.s, off), shfl_xor(a.d, off)};
}
__device__ __forceinline__ Kl shfl_xor(const Kl& a, int off) {
  return {shfl_xor(a.mx, off), shfl_xor(a.sx, off), shfl_xor(a.tx, off)};
}
__device__ __forceinline__ ArgMax shfl_xor(const ArgMax& a, int off) {
  return {shfl_xor(a.best, off), shfl_xor(a.idx, off)};
}

// ---- Thread layout --------------------------------------------------------------------------
// A block handles a tile of `tile` consecutive positions; each position's vocabulary is split
// over `splits` threads, split s taking the 4-entry blocks v4 = s, s + splits, ...
//   kSplitFast = false (inner > 1): thread t has position lane t % tile (tile = 32: a warp reads
//     32 adjacent positions of one vocabulary row, coalesced) and split t / tile (one split per
//     warp); the statistics are combined across warps in shared memory.
//   kSplitFast = true (inner == 1, vocabulary contiguous): thread t has split t % splits and
//     position lane t / splits; splits <= 32 combine by warp shuffles, more (a block per position)
//     by shuffles then shared memory.
struct Layout {
  int lane;    // position within the tile
  int split;   // which vocabulary blocks
  int splits;  // threads per position
  int tile;    // positions per block
};

template <bool kSplitFast>
__device__ __forceinline__ Layout thread_layout(int splits) {
  const int t = static_cast<int>(threadIdx.x);
  const int tile = static_cast<int>(blockDim.x) / splits;
  if constexpr (kSplitFast) return {t / splits, t % splits, splits, tile};
  return {t % tile, t / tile, splits, tile};
}

// Combines the per-thread statistics `x` of all splits of each position; every thread gets its
// position's total, the same bits for every thread of a position. `smem` holds blockDim.x / 32
// (kSplitFast) or blockDim.x (otherwise) entries of S. Contains __syncthreads: call from all
// threads of the block, and __syncthreads before reusing smem.
template <bool kSplitFast, class S, class Merge>
__device__ __forceinline__ S reduce_splits(S x, const Layout& l, S* smem, Merge merge) {
  int per_warp = 1;  // splits of a position inside one warp
  if constexpr (kSplitFast) {
    per_warp = l.splits < kWarp ? l.splits : kWarp;
    const int lane = static_cast<int>(threadIdx.x) % kWarp;
    for (int off = 1; off < per_warp; off <<= 1) {
      const S y = shfl_xor(x, off);
      x = (lane & off) == 0 ? merge(x, y) : merge(y, x);
    }
  }
  const int groups = l.splits / per_warp;  // warps per position
  if (groups == 1) return x;
  if constexpr (kSplitFast) {
    if (l.split % kWarp == 0) smem[(l.split / kWarp) * l.tile + l.lane] = x;
  } else {
    smem[l.split * l.tile + l.lane] = x;
  }
  __syncthreads();
  S acc = smem[l.lane];
  for (int w = 1; w < groups; ++w) acc = merge(acc, smem[w * l.tile + l.lane]);
  return acc;
}

// ---- Launch configuration (host) -------------------------------------------------------------
struct LaunchConfig {
  bool split_fast;  // inner == 1
  int splits;       // threads per position (a power of two)
  int threads;      // block size
  int tile;         // positions per block
  unsigned int grid;
  size_t smem_entries;  // statistics slots in shared memory
};

// Threads the device keeps resident (SMs x 2048), the parallelism the split choice aims at.
inline int64_t resident_threads() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 132;
  return int64_t(sms) * 2048;
}

// inner > 1: tiles of 32 adjacent positions, 4 to 16 splits (one per warp), more splits while
// the grid would not fill the device twice over and each thread keeps >= 8 blocks of 4 entries.
// inner == 1: splits from about vocab / 32 entries (up to a warp), then up to 512 threads per
// position while the device is not filled twice over and each thread keeps >= 4 blocks.
inline LaunchConfig make_config(const GumbelParams& p) {
  const int64_t positions = p.outer * p.inner, J = (p.vocab + 3) / 4;
  const int64_t target = 2 * resident_threads();
  LaunchConfig c{};
  c.split_fast = p.inner == 1;
  if (!c.split_fast) {
    c.tile = kWarp;
    const int64_t tiles = (positions + c.tile - 1) / c.tile;
    c.splits = 4;
    while (c.splits < 16 && tiles * c.tile * c.splits < target && J >= int64_t(c.splits) * 2 * 8) c.splits *= 2;
    c.threads = c.tile * c.splits;
    c.smem_entries = static_cast<size_t>(c.threads);
  } else {
    c.splits = 1;
    while (c.splits < kWarp && int64_t(c.splits) * 8 < J) c.splits *= 2;
    while (c.splits < kMaxThreads && positions * c.splits < target && J >= int64_t(c.splits) * 2 * 4) c.splits *= 2;
    c.threads = c.splits > 256 ? c.splits : 256;
    c.tile = c.threads / c.splits;
    c.smem_entries = static_cast<size_t>(c.threads / kWarp);
  }
  int64_t tiles = (positions + c.tile - 1) / c.tile;
  const int64_t cap = int64_t(1) << 30;  // the kernels loop over tiles, so any cap is correct
  if (tiles > cap) tiles = cap;
  c.grid = static_cast<unsigned int>(tiles < 1 ? 1 : tiles);
  return c;
}

inline bool aligned_for_vec(const void* ptr, size_t elem_size) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (4 * elem_size) == 0;
}

}  // namespace dalle_fast::cuda::gumbel_detail
#endif  // __CUDACC__
