// CPU sparse-attention kernels: flash-style tiles over only the keys each tile's mask reaches.
#pragma once

#include <cstdint>

#include "../params.h"

namespace dalle_fast::cpu {

constexpr int64_t kTile = 32;   // query rows per query tile, key rows per key tile
constexpr int64_t kChunk = 32;  // keys (or queries) processed per inner step

// Fills p.out and p.lse. T is float or double.
template <class T>
void attention_forward(const AttnParams& p);

// Fills p.dq, p.dk, p.dv; p.delta must point at a [B, H, N] workspace of T.
template <class T>
void attention_backward(const AttnParams& p);

}  // namespace dalle_fast::cpu
