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
  // sparse_decode_append: this step's key and value [B, H, D] (last dim contiguous; as a BHND
  // of one row, sn = 0), which the kernel writes to row text_len + g of the caches and reads
  // from here (null ptr: the caches hold them).
  BHND k_new, v_new;

  // Key j of the step's list: text keys 0..T-1, then image keys; -1 when not allowed (or outside
  // the cache, which only a position g outside the image can cause).
  DF_HD int64_t key(int64_t j, int64_t g_value) const {
    return key_at(j, g_value, j < text_len ? 0 : offsets[j - text_len]);
  }
  // The same with the image key's offset (offsets[j - text_len]) already loaded.
  // g_value and offset come from tensors the checks cannot read (device memory), so any int64
  // may arrive: the bounds are compared without forming text_len + g or g - offset first
  // (signed overflow; it wrapped a huge g onto a text row).
  DF_HD int64_t key_at(int64_t j, int64_t g_value, int64_t offset) const {
    if (j < text_len) return j;
    if (g_value < offset) return -1;  // a key after the query
    const int64_t rows = seq - text_len;  // image rows of the cache; prepare_decode: text_len <= seq
    const bool inside = offset >= 0 ? g_value - offset < rows : g_value < rows + offset;
    return inside ? text_len + (g_value - offset) : -1;
  }
  DF_HD int64_t num_keys() const { return text_len + num_offsets; }
  template <class T>
  DF_HD const T* q_row(int64_t b, int64_t h) const {
    return static_cast<const T*>(q) + b * q_sb + h * q_sh;
  }
  // Whether this call writes this step's key and value to row text_len + g: appending, and g a
  // position inside the cache (append() and the reads below agree on it).
  DF_HD bool writes_row(int64_t g_value) const {
    return k_new.ptr != nullptr && g_value >= 0 && g_value < seq - text_len;
  }
  // Where key `key` (a cache row) of (b, h) is read: this step's k_new / v_new for the row this
  // call writes, else the cache (writes_row first: it bounds g, so text_len + g cannot overflow).
  template <class T>
  DF_HD const T* k_row(int64_t b, int64_t h, int64_t key, int64_t g_value) const {
    return writes_row(g_value) && key == text_len + g_value ? k_new.row<const T>(b, h, 0) : k.row<const T>(b, h, key);
  }
  template <class T>
  DF_HD const T* v_row(int64_t b, int64_t h, int64_t key, int64_t g_value) const {
    return writes_row(g_value) && key == text_len + g_value ? v_new.row<const T>(b, h, 0) : v.row<const T>(b, h, key);
  }
  // Appending: (b, h)'s threads copy this step's key and value into the caches (thread `t` of
  // `threads` takes elements t, t + threads, ...); nothing for a position outside the cache.
  template <class T>
  DF_HD void append(int64_t b, int64_t h, int64_t g_value, int64_t t, int64_t threads) const {
    if (!writes_row(g_value)) return;
    const T* kn = k_new.row<const T>(b, h, 0);
    const T* vn = v_new.row<const T>(b, h, 0);
    T* kc = k.row<T>(b, h, text_len + g_value);
    T* vc = v.row<T>(b, h, text_len + g_value);
#pragma unroll 1
    for (int64_t d = t; d < dim; d += threads) {  // once, for the kernels' threads >= dim
      kc[d] = kn[d];
      vc[d] = vn[d];
    }
  }
};

}  // namespace dalle_fast
