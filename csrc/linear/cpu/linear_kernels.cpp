// The skinny_linear CPU kernel: a few rows of x (a sampling step's batch) against every row of the
// weight, both read along k. PyTorch's addmm (MKL) runs such products at 35-45 GFLOP/s on one core
// of an AVX2 machine and no faster on two; here each thread takes a share of the weight's rows and
// multiplies a block of rows of x by a block of weight rows at a time, each weight vector loaded
// once for all the block's rows of x and each x vector once for all its weight rows:
// - 8 lanes (AVX2, and the fallback): 4 x 3 blocks, 12 accumulators (all 16 of AVX2's registers);
// - 16 lanes (AVX-512): 4 x 4 blocks, 16 accumulators of 32 registers, whose lane sums make one
//   vector (one tree of shuffles for all 16). DALLE_FAST_LINEAR_AVX512=0 in the environment keeps
//   an AVX-512 CPU on the 8-lane blocks (to compare the two).
// The lanes are GCC / Clang vector types: with plain arrays GCC kept the accumulators in memory.
#include "linear_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "../../cpu_math.h"
#include "../../env_switch.h"

#ifdef DF_CPU_CLONING
#include <immintrin.h>
#endif

namespace dalle_fast::cpu {

namespace {

typedef float f32x8 __attribute__((vector_size(32)));
// The same, at any float's address (an unaligned load).
typedef float f32x8_any __attribute__((vector_size(32), aligned(4), may_alias));

DF_ALWAYS_INLINE const f32x8_any& lanes(const float* p) { return *reinterpret_cast<const f32x8_any*>(p); }

// Lanes of (a, b) picked by index (0-7 a's, 8-15 b's): __builtin_shufflevector in Clang and
// GCC >= 12, __builtin_shuffle with an index vector before.
#if defined(__clang__) || __GNUC__ >= 12
#define DF_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int i32x8 __attribute__((vector_size(32)));
#define DF_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i32x8{__VA_ARGS__})
#endif

// The sums of the lanes of a, b, c and d, in lanes 0-3: pairs, then quads, then the halves, each
// step one shuffle-and-add for all four (the accumulators' lane-by-lane sums cost more than the
// products they end at short k).
DF_ALWAYS_INLINE void sum_lanes4(const f32x8& a, const f32x8& b, const f32x8& c, const f32x8& d, float* sums) {
  const f32x8 ab = DF_SHUFFLE8(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + DF_SHUFFLE8(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 cd = DF_SHUFFLE8(c, d, 0, 8, 2, 10, 4, 12, 6, 14) + DF_SHUFFLE8(c, d, 1, 9, 3, 11, 5, 13, 7, 15);
  const f32x8 quads =
      DF_SHUFFLE8(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) + DF_SHUFFLE8(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);
  const f32x8 halves = quads + DF_SHUFFLE8(quads, quads, 4, 5, 6, 7, 0, 1, 2, 3);
  for (int i = 0; i < 4; ++i) sums[i] = halves[i];
}

constexpr int kRowBlock = 4;  // rows of x per block (sum_lanes4 reduces 4 at once)
constexpr int kColBlock = 3;  // rows of the weight (output columns) per block

// out[r * ldo + c] = sum_q x[r * ldx + q] w[c * k + q] for r < R, c < C.
template <int R, int C>
DF_ALWAYS_INLINE void dot_block(int64_t k, const float* __restrict x, int64_t ldx, const float* __restrict w,
                                float* __restrict out, int64_t ldo) {
  f32x8 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = f32x8{};
  int64_t q = 0;
  for (; q + 8 <= k; q += 8) {
    f32x8 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = lanes(w + c * k + q);
    for (int r = 0; r < R; ++r) {
      const f32x8 xv = lanes(x + r * ldx + q);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  // Both branches add a lane sum in one order (sum_lanes4's), so a row's result does not depend
  // on whether it fell in a block of 4 or in the last rows (on the batch size).
  static_assert(kRowBlock == 4, "sum_lanes4 reduces 4 rows' accumulators");
  for (int c = 0; c < C; ++c) {
    float sums[R];
    if constexpr (R == kRowBlock) {
      sum_lanes4(acc[0][c], acc[1][c], acc[2][c], acc[3][c], sums);
    } else {
      for (int r = 0; r < R; ++r) {
        const f32x8 a = acc[r][c];
        sums[r] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t t = q; t < k; ++t) sums[r] += x[r * ldx + t] * w[c * k + t];
      out[r * ldo + c] = sums[r];
    }
  }
}

// Columns [c, c + C) of out, every row: the products.
template <int C>
DF_ALWAYS_INLINE void column_block(const LinearParams& p, const float* x, int64_t ldx, int64_t c) {
  const float* w = static_cast<const float*>(p.w) + c * p.k;
  float* out = static_cast<float*>(p.out) + c;
  int64_t r = 0;
  for (; r + kRowBlock <= p.m; r += kRowBlock) dot_block<kRowBlock, C>(p.k, x + r * ldx, ldx, w, out + r * p.n, p.n);
  for (; r < p.m; ++r) dot_block<1, C>(p.k, x + r * ldx, ldx, w, out + r * p.n, p.n);
}

#ifdef DF_CPU_CLONING
// 16 lanes, for the AVX-512 version of `columns` alone (these functions are compiled for it).
#define DF_PRAGMA(text) _Pragma(#text)
#define DF_TARGET_PRAGMA(isa) DF_PRAGMA(GCC target(isa))  // isa expanded first
#pragma GCC push_options
DF_TARGET_PRAGMA(DF_ISA_TOP)

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_any __attribute__((vector_size(64), aligned(4), may_alias));

// Lanes 0-7: the sums of a's adjacent lane pairs; lanes 8-15: b's.
DF_ALWAYS_INLINE f32x16 pair_sums(const f32x16& a, const f32x16& b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane j of the result: the sum of v[j]'s lanes, in pairs, then pairs of pairs... (one tree for
// every v[j], whatever the other 15 hold; 30 shuffles and 15 adds for all 16).
DF_ALWAYS_INLINE f32x16 sum_lanes16(const f32x16 (&v)[16]) {
  f32x16 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i) s[i] = pair_sums(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) t[i] = pair_sums(s[2 * i], s[2 * i + 1]);
  for (int i = 0; i < 2; ++i) u[i] = pair_sums(t[2 * i], t[2 * i + 1]);
  return pair_sums(u[0], u[1]);
}

constexpr int kBlock16 = 4;  // rows of x and of the weight per block: 16 accumulators, one lane sum

// out[r * ldo + c] = sum_q x[r * ldx + q] w[c * k + q] for r < R, c < C. Accumulator r * 4 + c
// takes x row r times weight row c; the last k % 16 terms come in a masked load, zeros beyond k.
// A block of fewer rows or columns leaves its other accumulators at zero: a row's result does not
// depend on the block it fell in (on the batch size), nor a column's on the threads' split.
template <int R, int C>
DF_ALWAYS_INLINE void dot_block16(int64_t k, const float* __restrict x, int64_t ldx, const float* __restrict w,
                                  float* __restrict out, int64_t ldo) {
  f32x16 acc[kBlock16 * kBlock16];
  for (auto& a : acc) a = f32x16{};
  for (int64_t q = 0; q < k; q += 16) {
    const __mmask16 mask = k - q >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - q)) - 1);
    f32x16 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(mask, w + c * k + q);
    for (int r = 0; r < R; ++r) {
      const f32x16 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + q);
      for (int c = 0; c < C; ++c) acc[r * kBlock16 + c] += xv * wv[c];
    }
  }
  const f32x16 sums = sum_lanes16(acc);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * ldo + c] = sums[r * kBlock16 + c];
}

// Columns [c, c + C) of out, every row: the products.
template <int C>
DF_ALWAYS_INLINE void column_block16(const LinearParams& p, const float* x, int64_t ldx, int64_t c) {
  const float* w = static_cast<const float*>(p.w) + c * p.k;
  float* out = static_cast<float*>(p.out) + c;
  int64_t r = 0;
  for (; r + kBlock16 <= p.m; r += kBlock16) dot_block16<kBlock16, C>(p.k, x + r * ldx, ldx, w, out + r * p.n, p.n);
  const float* xr = x + r * ldx;
  float* o = out + r * p.n;
  switch (p.m - r) {
    case 3: dot_block16<3, C>(p.k, xr, ldx, w, o, p.n); break;
    case 2: dot_block16<2, C>(p.k, xr, ldx, w, o, p.n); break;
    case 1: dot_block16<1, C>(p.k, xr, ldx, w, o, p.n); break;
    default: break;
  }
}

DF_ALWAYS_INLINE void products16(const LinearParams& p, const float* x, int64_t ldx, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + kBlock16 <= c1; c += kBlock16) column_block16<kBlock16>(p, x, ldx, c);
  for (; c < c1; ++c) column_block16<1>(p, x, ldx, c);
}

#pragma GCC pop_options
#endif

DF_ALWAYS_INLINE void products8(const LinearParams& p, const float* x, int64_t ldx, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + kColBlock <= c1; c += kColBlock) column_block<kColBlock>(p, x, ldx, c);
  for (; c < c1; ++c) column_block<1>(p, x, ldx, c);
}

// Columns [c0, c1) of out: the bias added, the activation applied, the residual added, in that
// order, each result rounded to float as separate ops would round it.
DF_ALWAYS_INLINE void epilogue(const LinearParams& p, int64_t c0, int64_t c1) {
  float* out = static_cast<float*>(p.out);
  const int64_t m = p.m, n = p.n;
  const float* bias = static_cast<const float*>(p.bias);
  const float* res = static_cast<const float*>(p.residual);
  const bool apply_gelu = p.activation == Activation::Gelu;
  for (int64_t r = 0; r < m; ++r) {
    float* __restrict o = out + r * n;
    if (bias != nullptr)
      for (int64_t j = c0; j < c1; ++j) o[j] += bias[j];
    if (apply_gelu)
      for (int64_t j = c0; j < c1; ++j) o[j] = gelu(o[j]);
    if (res != nullptr) {
      const float* __restrict rr = res + r * p.res_stride;
      for (int64_t j = c0; j < c1; ++j) o[j] += rr[j];
    }
  }
}

// Columns [c0, c1) of out: the products, then the epilogue; one version per instruction set,
// picked as DF_CPU_CLONES picks (the AVX-512 one with 16-lane blocks unless `wide` is false).
#ifdef DF_CPU_CLONING
__attribute__((target(DF_ISA_TOP))) void columns(const LinearParams& p, const float* x, int64_t ldx, int64_t c0,
                                                 int64_t c1, bool wide) {
  if (wide)
    products16(p, x, ldx, c0, c1);
  else
    products8(p, x, ldx, c0, c1);
  epilogue(p, c0, c1);
}

__attribute__((target(DF_ISA_MID))) void columns(const LinearParams& p, const float* x, int64_t ldx, int64_t c0,
                                                 int64_t c1, bool) {
  products8(p, x, ldx, c0, c1);
  epilogue(p, c0, c1);
}

__attribute__((target("default")))
#endif
void columns(const LinearParams& p, const float* x, int64_t ldx, int64_t c0, int64_t c1, bool) {
  products8(p, x, ldx, c0, c1);
  epilogue(p, c0, c1);
}

// x's rows layer-normalised into `dst` [m, k] as nn.LayerNorm does: biased variance, eps inside
// the root. Two passes (the mean, then the squares about it), so a large mean costs no precision.
DF_CPU_CLONES void layer_norm(const LinearParams& p, float* dst) {
  const float* x = static_cast<const float*>(p.x);
  const float* __restrict g = static_cast<const float*>(p.ln_weight);
  const float* __restrict b = static_cast<const float*>(p.ln_bias);
  const float inv_k = 1.0f / static_cast<float>(p.k);
  for (int64_t r = 0; r < p.m; ++r) {
    const float* __restrict xr = x + r * p.x_stride;
    const float mean = sum8<float>(p.k, [xr](int64_t q) { return xr[q]; }) * inv_k;
    const float var = sum8<float>(p.k, [xr, mean](int64_t q) { return (xr[q] - mean) * (xr[q] - mean); }) * inv_k;
    const float rstd = 1.0f / std::sqrt(var + p.ln_eps);
    float* __restrict d = dst + r * p.k;
    for (int64_t q = 0; q < p.k; ++q) d[q] = (xr[q] - mean) * rstd * g[q] + b[q];
  }
}

}  // namespace

void skinny_linear_f32(const LinearParams& p) {
  if (p.m <= 0 || p.n <= 0) return;
  const float* x = static_cast<const float*>(p.x);
  int64_t ldx = p.x_stride;
  std::vector<float> normed;
  if (p.ln_weight != nullptr) {
    normed.resize(static_cast<size_t>(p.m * p.k));
    layer_norm(p, normed.data());
    x = normed.data();
    ldx = p.k;
  }
  // Column chunks of 24 weight rows (8 blocks of 3, 6 of 4); products under ~64K multiply-adds
  // stay on the calling thread, where starting the others would cost more than they save.
  constexpr int64_t chunk = 24;
  static_assert(chunk % kColBlock == 0 && (chunk % 4) == 0, "chunks of whole blocks");
  const bool wide = !env_is("DALLE_FAST_LINEAR_AVX512", "0");
  const int64_t chunks = (p.n + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, p.m * p.k * chunk));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    columns(p, x, ldx, begin * chunk, std::min(p.n, end * chunk), wide);
  });
}

}  // namespace dalle_fast::cpu
