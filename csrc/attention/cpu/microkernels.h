// Small dense building blocks of the CPU attention kernels: a register-blocked matrix
// multiply on packed tiles and a vectorisable exp. Written as plain loops with constant trip
// counts so the compiler vectorises them; the callers are compiled once per instruction set
// (DF_CPU_CLONES) and picked at run time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DF_CPU_CLONES
#endif

#define DF_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dalle_fast::cpu {

// C[m x n] (=, or += when accumulate) A[m x kd] * B[kd x n]. A is strided (element (i, p) at
// A[i * ars + p * acs], so a transposed operand costs nothing: its elements are broadcast one
// at a time); B and C are row-major with leading dimensions ldb, ldc.
template <class T>
DF_ALWAYS_INLINE void gemm(int64_t m, int64_t n, int64_t kd, const T* __restrict A, int64_t ars, int64_t acs,
                           const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  constexpr int64_t NB = 128 / sizeof(T);  // two 512-bit vectors of columns
  constexpr int64_t MB = 4;                // rows sharing each load of B
  for (int64_t j0 = 0; j0 < n; j0 += NB) {
    const int64_t nb = std::min(NB, n - j0);
    const int64_t m_blocked = nb == NB ? m - m % MB : 0;
    for (int64_t i0 = 0; i0 < m_blocked; i0 += MB) {
      T acc[MB][NB];
      for (int64_t r = 0; r < MB; ++r)
        for (int64_t j = 0; j < NB; ++j) acc[r][j] = accumulate ? C[(i0 + r) * ldc + j0 + j] : T(0);
      for (int64_t p = 0; p < kd; ++p) {
        const T* __restrict b = B + p * ldb + j0;
        for (int64_t r = 0; r < MB; ++r) {
          const T a = A[(i0 + r) * ars + p * acs];
          for (int64_t j = 0; j < NB; ++j) acc[r][j] += a * b[j];
        }
      }
      for (int64_t r = 0; r < MB; ++r)
        for (int64_t j = 0; j < NB; ++j) C[(i0 + r) * ldc + j0 + j] = acc[r][j];
    }
    for (int64_t i = m_blocked; i < m; ++i) {  // leftover rows, or a partial column block
      T* __restrict c = C + i * ldc + j0;
      if (!accumulate)
        for (int64_t j = 0; j < nb; ++j) c[j] = T(0);
      for (int64_t p = 0; p < kd; ++p) {
        const T a = A[i * ars + p * acs];
        const T* __restrict b = B + p * ldb + j0;
        for (int64_t j = 0; j < nb; ++j) c[j] += a * b[j];
      }
    }
  }
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
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DF_ALWAYS_INLINE double exp_nonpos(double x) { return std::exp(x); }

}  // namespace dalle_fast::cpu
