// The sparse_decode op (one sampling step's attention over a KV cache): its checks, turning
// tensors into the plain DecodeParams (decode_params.h) its kernels read. See dalle_fast/ops/decode.py.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "decode_params.h"

namespace dalle_fast {

struct DecodeCall {
  at::Tensor q, k, v, offsets, g, out;
  DecodeParams params;
};

DecodeCall prepare_decode(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                          const at::Tensor& offsets, const at::Tensor& g, int64_t text_len, double scale);

}  // namespace dalle_fast
