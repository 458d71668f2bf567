// Vectorisable scalar math for the CPU kernels: exp and low-precision loads and stores
// written as branch-free arithmetic, so loops over them vectorise without -ffast-math (which
// would break the -inf handling the kernels rely on). Functions that contain such loops are
// compiled once per instruction set with DF_CPU_CLONES and picked at run time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DF_CPU_CLONING 1
// The instruction sets, best first, each a level of the x86-64 psABI, which GCC 12 dispatches by
// the CPU's features: arch=x86-64-v3 is AVX2 with FMA (so a * b + c contracts and std::fma stays
// an instruction) and F16C (float16 loads and stores in one instruction each); x86-64-v4 adds
// AVX-512 F/BW/CD/DQ/VL. Two spellings before were wrong: arch=haswell is dispatched by CPU model
// (only an Intel Haswell took that clone; every other AVX2 CPU ran the SSE2 default, 10x slower),
// and a bare "avx512f" leaves out FMA and F16C (every AVX-512 CPU ran separate multiplies and
// adds, and converted float16 in software: the float16 Gumbel kernels 10x slower than float32).
#if __GNUC__ >= 12
#define DF_ISA_TOP "arch=x86-64-v4"
#define DF_ISA_MID "arch=x86-64-v3"
#else
#define DF_ISA_TOP "avx512f"  // no FMA or F16C in these two clones: std::fma is a library call there
#define DF_ISA_MID "avx2"
#endif
#define DF_CPU_CLONES __attribute__((target_clones(DF_ISA_TOP, DF_ISA_MID, "default")))
#else
#define DF_CPU_CLONES
#endif

#define DF_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dalle_fast::cpu {

DF_ALWAYS_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

DF_ALWAYS_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// exp(x) for x <= 0 (scores minus their running max), exactly 0 for x = -inf. Relative error
// about 2e-7: 2^x split into 2^n (exponent bits) times a degree-6 series for 2^f, |f| <= 1/2.
DF_ALWAYS_INLINE float exp_nonpos(float x) {
  x = std::max(x, -88.0f);  // -inf and tiny results land on exponent 0: exactly 0
  const float t = x * 1.44269504088896341f;
  // Round to nearest with the 1.5 * 2^23 trick: unlike std::floor it vectorises without -ffast-math.
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float y = (t - n) * 0.693147180559945309f;
  float p = 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

DF_ALWAYS_INLINE double exp_nonpos(double x) { return std::exp(x); }

// 0.5 * erfc(a) for a >= 0, accurate in relative terms however small it gets (1 - erf(a) loses
// every digit once erfc(a) falls below float's epsilon): the Chebyshev fit of Numerical Recipes'
// erfcc, erfc(a) = t exp(-a^2 + P(t)) with t = 1 / (1 + a / 2), fractional error below 1.2e-7,
// and exp_nonpos. In float32 its relative error is at most ~1.2e-6 (10 eps) for a <= 2 and grows
// about as a^2 * 2e-7 beyond (the rounding of a^2 and the exponent); 0 past a = 9.3 (x < -13.2),
// where x * Phi(x) is below 1e-38.
DF_ALWAYS_INLINE float half_erfc_nonneg(float a) {
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;  // P(1) is 3e-8: the exponent is at most that, and clamped to 0
  return 0.5f * t * exp_nonpos(std::min(p - a * a, 0.0f));
}

// The exact GELU, x * Phi(x) with Phi(x) = 0.5 * erfc(-x / sqrt 2) (nn.GELU()): Phi from
// half_erfc_nonneg on either side of 0, so a large negative x keeps its tiny result in relative
// terms where 0.5 * (1 + erf(x / sqrt 2)) cancels to 0. NaN stays NaN, gelu(inf) = inf and
// gelu(-inf) = -inf * 0 = NaN.
DF_ALWAYS_INLINE float gelu(float x) {
  const float tail = half_erfc_nonneg(std::fabs(x) * 0.70710678118654752f);
  return x * (x < 0.0f ? tail : 1.0f - tail);
}

// Storage types: loads widen to float, stores round to nearest even.
struct StoreF32 {
  using type = float;
  static DF_ALWAYS_INLINE float load(float x) { return x; }
  static DF_ALWAYS_INLINE float store(float x) { return x; }
};

struct StoreBF16 {
  using type = uint16_t;
  static DF_ALWAYS_INLINE float load(uint16_t x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }
  static DF_ALWAYS_INLINE uint16_t store(float x) {
    const uint32_t bits = float_to_bits(x);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);  // keep NaN a NaN
  }
};

struct StoreF16 {
  using type = _Float16;
  static DF_ALWAYS_INLINE float load(_Float16 x) { return static_cast<float>(x); }
  static DF_ALWAYS_INLINE _Float16 store(float x) { return static_cast<_Float16>(x); }
};

// The sum of term(i) over i < n in 8 running sums, which vectorise (one running sum is a serial
// chain of adds that the compiler may not reorder): the tail first, then the 8 sums in order.
template <class T, class Term>
DF_ALWAYS_INLINE T sum8(int64_t n, Term term) {
  constexpr int64_t kLanes = 8;
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += term(i + l);
  T s = 0;
  for (; i < n; ++i) s += term(i);
  for (int64_t l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

}  // namespace dalle_fast::cpu
