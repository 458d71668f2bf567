// Stand-in for cuda_fp16.h: IEEE half storage with round-to-nearest-even conversions.
#pragma once

#include <cmath>
#include <cstdint>

#include "emu_device.h"

struct __half {
  uint16_t __x;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  if (e == 0) return ::emu::bit_cast<float>(sign | ::emu::bit_cast<uint32_t>(std::ldexp(static_cast<float>(m), -24)));
  if (e == 31) return ::emu::bit_cast<float>(sign | 0x7f800000u | (m << 13));
  return ::emu::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t x = ::emu::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u))};
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), in units of 2^-24
    const float a = ::emu::bit_cast<float>(ax);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)))};
  }
  const uint32_t m = ax + 0xc8000fffu + ((ax >> 13) & 1u);  // rebias the exponent by -112, round to even
  return {static_cast<uint16_t>(sign | (m >> 13))};
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
