// The sparse_decode op (one sampling step's attention over a KV cache): its checks, turning
// tensors into the plain DecodeParams (decode_params.h) its kernels read. See dalle_fast/ops/decode.py.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "decode_params.h"

namespace dalle_fast {

struct DecodeCall {
  at::Tensor q, k, v, offsets, g, out, k_new, v_new;
  DecodeParams params;
};

DecodeCall prepare_decode(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                          const at::Tensor& offsets, const at::Tensor& g, int64_t text_len, double scale);

// sparse_decode_append: also k_new / v_new [B, H, D] of q's dtype and device; the caches are
// written in place, so their last dim must be contiguous (no copy).
DecodeCall prepare_decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& offsets,
                                 const at::Tensor& g, int64_t text_len, double scale);

}  // namespace dalle_fast
