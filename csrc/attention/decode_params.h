// Plain params of the sparse_decode kernels (no torch types, so the .cu files stay light).
#pragma once

#include <cstdint>

#include "params.h"

namespace dalle_fast {

struct DecodeParams {
  int64_t batch = 0, heads = 0, seq = 0, dim = 0, text_len = 0, num_offsets = 0;
  double scale = 1.0;
  const void* q = nullptr;  // [B, H, D], last dim contiguous (a sampler's q is a view of its qkv projection)
  int64_t q_sb = 0, q_sh = 0;  // element strides of B and H
  BHND k, v;                // the caches [B, H, N, D], last dim contiguous
  const int64_t* offsets = nullptr;  // [K]: image keys g - offsets[i] when >= 0
  const int64_t* g = nullptr;        // the query's image position (host or device memory, as the tensors)
  void* out = nullptr;               // [B, H, D], contiguous

  // Key j of the step's list: text keys 0..T-1, then image keys; -1 when not allowed (or outside
  // the cache, which only a position g outside the image can cause).
  DF_HD int64_t key(int64_t j, int64_t g_value) const {
    if (j < text_len) return j;
    const int64_t src = g_value - offsets[j - text_len];
    return src >= 0 && text_len + src < seq ? text_len + src : -1;
  }
  DF_HD int64_t num_keys() const { return text_len + num_offsets; }
  template <class T>
  DF_HD const T* q_row(int64_t b, int64_t h) const {
    return static_cast<const T*>(q) + b * q_sb + h * q_sh;
  }
};

}  // namespace dalle_fast
