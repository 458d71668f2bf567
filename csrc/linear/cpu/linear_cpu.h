// CPU kernel of the skinny_linear op (float32): plain LinearParams in, no torch types.
#pragma once

#include "../linear_params.h"

namespace dalle_fast::cpu {

// out = ln(x) w^T + bias, plus the residual when p.activation is None (with GELU the caller
// applies the activation, then adds the residual). The weight's rows (out's columns) are split
// over torch's threads; each output is one thread's dot product over k, in an order that depends
// neither on the thread count nor on the other rows of x.
void skinny_linear_f32(const LinearParams& p);

}  // namespace dalle_fast::cpu
