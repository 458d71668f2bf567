// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), the counter-based
// generator PyTorch's CUDA generator is built on, and the Gumbel noise drawn from it. Host and
// device code share it, so a (seed, offset) gives bit-identical noise on CPU and GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DF_PHILOX_HD __host__ __device__ __forceinline__
#else
#define DF_PHILOX_HD inline
#endif

namespace dalle_fast::philox {

struct U32x4 {
  uint32_t x, y, z, w;
};

DF_PHILOX_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
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

// A uniform float strictly inside (0, 1): (k + 1/2) / 2^23 for the top 23 bits k, so the
// extremes are 2^-24 and 1 - 2^-24, both exact, and -log(-log(u)) is always finite.
DF_PHILOX_HD float uniform_open(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// The noise of element (position, v) of a call with (seed, offset): one Philox call gives the
// uniforms of v = 4j .. 4j+3 at one position, so blocks of 4 vocabulary entries share it.
DF_PHILOX_HD U32x4 gumbel_bits(uint64_t seed, uint64_t offset, uint64_t position, uint64_t v4) {
  const U32x4 counter{static_cast<uint32_t>(position), static_cast<uint32_t>(v4), static_cast<uint32_t>(offset),
                      static_cast<uint32_t>(offset >> 32) ^ static_cast<uint32_t>(position >> 32)};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace dalle_fast::philox
