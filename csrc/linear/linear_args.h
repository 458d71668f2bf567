// The skinny_linear op's checks, shared by its CPU and CUDA bindings: tensors in, the plain
// LinearParams (linear_params.h) its kernels read out. See dalle_fast/ops/linear.py.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

#include "linear_params.h"

namespace dalle_fast {

struct LinearCall {
  at::Tensor x, weight, bias, residual, ln_weight, ln_bias, out;  // what params points into
  LinearParams params;
};

// Checks shapes, dtypes (all of x's), devices, the activation and the norm's eps; allocates out
// [M, N]. Rows are read `row_align` elements at a time from an address aligned to as many
// elements: x is copied unless its last dim is contiguous, its row stride a multiple of row_align
// and it starts so aligned; the weight and the norm's vectors unless contiguous and so aligned;
// bias and residual unless contiguous (along the row, for residual). The caller sets the device
// (a CUDA guard) first: copies are made there.
LinearCall prepare_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, int64_t activation,
                          const std::optional<at::Tensor>& ln_weight, const std::optional<at::Tensor>& ln_bias,
                          double ln_eps, int64_t row_align);

}  // namespace dalle_fast
