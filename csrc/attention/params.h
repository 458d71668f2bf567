// Plain parameter structs for the sparse-attention kernels: raw pointers, sizes and strides,
// no torch types, so the same struct feeds the CPU and the CUDA kernels.
#pragma once

#include <cstdint>

#include "../masks.h"

namespace dalle_fast {

// A [B, H, N, D] tensor whose last dimension is contiguous.
struct BHND {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sn = 0;  // element strides of B, H, N

  template <class T>
  DF_HD T* row(int64_t b, int64_t h, int64_t n) const {
    return static_cast<T*>(ptr) + b * sb + h * sh + n * sn;
  }
};

// A contiguous [B, H, N] tensor of per-row statistics (log-sum-exp, delta), in the accumulate type.
struct BHN {
  void* ptr = nullptr;
  int64_t heads = 0, seq = 0;

  template <class T>
  DF_HD T* at(int64_t b, int64_t h) const {
    return static_cast<T*>(ptr) + (b * heads + h) * seq;
  }
};

struct AttnParams {
  int64_t batch = 0, heads = 0, seq = 0, dim = 0;
  double scale = 1.0;
  MaskSpec mask{};

  BHND q, k, v, out;
  BHN lse;

  // backward only
  BHND dout, dq, dk, dv;
  BHN delta;  // rowsum(dout * out), workspace
};

}  // namespace dalle_fast
