// Stand-in for cuda_bf16.h: bfloat16 storage with round-to-nearest-even conversions.
#pragma once

#include <cstdint>

#include "emu_device.h"

struct __nv_bfloat16 {
  uint16_t __x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) { return ::emu::bit_cast<float>(uint32_t(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x = ::emu::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(x >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
