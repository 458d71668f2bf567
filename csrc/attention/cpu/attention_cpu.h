// CPU sparse-attention kernels: flash-style tiles over only the keys each tile's mask reaches.
#pragma once

#include <cstdint>

#include "../params.h"

namespace dalle_fast::cpu {

// Fills p.out and p.lse. T is float or double.
template <class T>
void attention_forward(const AttnParams& p);

// Fills p.dq, p.dk, p.dv; p.delta must point at a [B, H, N] workspace of T.
template <class T>
void attention_backward(const AttnParams& p);

}  // namespace dalle_fast::cpu
