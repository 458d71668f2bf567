// The small dense building block of the CPU attention kernels: a register-blocked matrix
// multiply on packed tiles, written as plain loops with constant trip counts so the compiler
// vectorises them; the callers are compiled once per instruction set (DF_CPU_CLONES).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../../cpu_math.h"


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

}  // namespace dalle_fast::cpu
