// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), the counter-based
// generator PyTorch's CUDA generator is built on, and the Gumbel noise drawn from it. Host and
// device code share it, so a (seed, offset) gives bit-identical noise on CPU and GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DF_PHILOX_HD __host__ __device__ __forceinline__
#else
#define DF_PHILOX_HD inline __attribute__((always_inline))
#endif

namespace dalle_fast::philox {

struct U32x4 {
  uint32_t x, y, z, w;
};

// The low and high halves of a * b. On the GPU as __umulhi and a * b, which nvcc fuses into one
// wide multiply; the 64-bit product's high half costs one more add per multiply there.
DF_PHILOX_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Four 32-bit outputs for one 128-bit counter under a 64-bit key.
DF_PHILOX_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo(0xCD9E8D57u, c.z, &hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

// The noise of element (position, v) of a call with (seed, offset): one Philox call gives the
// uniforms of v = 4j .. 4j+3 at one position, so blocks of 4 vocabulary entries share it.
DF_PHILOX_HD U32x4 gumbel_bits(uint64_t seed, uint64_t offset, uint64_t position, uint64_t v4) {
  const U32x4 counter{static_cast<uint32_t>(position), static_cast<uint32_t>(v4), static_cast<uint32_t>(offset),
                      static_cast<uint32_t>(offset >> 32) ^ static_cast<uint32_t>(position >> 32)};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

DF_PHILOX_HD float bits_as_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

DF_PHILOX_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
#endif
}

// float(k) for 0 <= k < 2^23 and float(e) for |e| < 2^22, exact, without an int-to-float
// conversion (GPUs run those on the quarter-rate pipe, three per noise value): the bit pattern
// of 2^23 + k (of 1.5 * 2^23 + e) as a float, minus 2^23 (1.5 * 2^23). Same bits as the casts.
DF_PHILOX_HD float small_uint_to_float(uint32_t k) { return bits_as_float(0x4B000000u | k) - 8388608.0f; }
DF_PHILOX_HD float small_int_to_float(int32_t e) {
  return bits_as_float(0x4B400000u + static_cast<uint32_t>(e)) - 12582912.0f;
}

// A uniform float strictly inside (0, 1): (k + 1/2) / 2^23 for the top 23 bits k, so the
// extremes are 2^-24 and 1 - 2^-24, both exact, and -log(-log(u)) is always finite.
// k + 1/2 is float(2^23 + k) - (2^23 - 1/2) in one exact subtraction (both terms and the result
// fit in 24 bits), the same bits as small_uint_to_float(k) + 0.5f.
DF_PHILOX_HD float uniform_open(uint32_t bits) {
  return (bits_as_float(0x4B000000u | (bits >> 9)) - 8388607.5f) * (1.0f / 8388608.0f);
}

// One rounding per multiply-add on every device and instruction set, so the noise is the same
// bits on CPU (any vector width) and GPU.
DF_PHILOX_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// log(x) for finite normal x > 0, relative error about 1e-7, accurate near 1 (where -log(u)
// lives for u close to 1): x = 2^e * m with m in [sqrt(1/2), sqrt(2)), t = m - 1 (exact), and
// log m = t - t^2 / 2 + t^3 q(t), q a degree-7 polynomial fitted to minimise the relative error
// on that interval (1.1e-8 before float rounding). Only integer adds and shifts, multiplies and
// fused multiply-adds: no division (GPUs run the reciprocal on the quarter-rate pipe) and no
// branch, so CPU loops over it vectorise.
DF_PHILOX_HD float log_pos(float x) {
  // e and m from integer arithmetic on the bits: subtracting the bits of the first mantissa past
  // sqrt(2) / 2 (0x3F3504F4) moves the exponent field up by one exactly where the mantissa is past
  // sqrt(2) (above 1.41421353f, the float nearest sqrt(2)), so the arithmetic shift gives e, and
  // taking e back out of the exponent field leaves m in [0.70710677f, 1.41421353f].
  const uint32_t bits = float_as_bits(x);
  const int32_t e = static_cast<int32_t>(bits - 0x3F3504F4u) >> 23;
  const float m = bits_as_float(bits - (static_cast<uint32_t>(e) << 23));
  const float t = m - 1.0f;  // exact: m in [1/2, 2]
  float q = -0.07859645783901215f;
  q = fma_rn(q, t, 0.12758950889110565f);
  q = fma_rn(q, t, -0.130731999874115f);
  q = fma_rn(q, t, 0.1419782191514969f);
  q = fma_rn(q, t, -0.16632233560085297f);
  q = fma_rn(q, t, 0.2000161111354828f);
  q = fma_rn(q, t, -0.2500056028366089f);
  q = fma_rn(q, t, 0.33333325386047363f);
  const float r = fma_rn(q, t, -0.5f);  // log m = t + t^2 r
  const float t2 = t * t;
  const float ef = small_int_to_float(e);
  // ln 2 = 0.693145751953125 (exact times any e here) + 1.4286068e-06
  return fma_rn(ef, 0.693145751953125f, fma_rn(t2, r, fma_rn(ef, 1.428606820309417e-06f, t)));
}

// The Gumbel(0, 1) noise of one 32-bit Philox output: -log(-log(u)), always finite.
DF_PHILOX_HD float gumbel_from_bits(uint32_t bits) { return -log_pos(-log_pos(uniform_open(bits))); }

}  // namespace dalle_fast::philox
