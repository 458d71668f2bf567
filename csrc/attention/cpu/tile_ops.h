// Pieces shared by the CPU forward and backward: rows in logical order, chunk operands, and the
// per-chunk mask. Score blocks are kept transposed, (entries x tile rows), so that every
// per-row statistic (max, sum, lse) is a vertical vector operation across the tile.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "../params.h"
#include "../tile_plan.h"
#include "microkernels.h"

namespace dalle_fast::cpu {

constexpr int64_t kTile = 32;   // rows per query tile and per key tile
constexpr int64_t kChunk = 32;  // keys (or queries) per inner step (the plan's chunk = its tile)

// One head's rows of a [B, H, N, D] tensor in logical order: the tensor itself when the order
// is the identity, otherwise a permuted copy.
template <class T>
struct LogicalRows {
  const T* base = nullptr;
  int64_t stride = 0;  // between consecutive logical rows
  const T* row(int64_t l) const { return base + l * stride; }
};

// Permuted copies for every (b, h) when the plan's order is not the identity, else nothing.
template <class T>
struct LogicalTensor {
  const BHND* src = nullptr;
  const TilePlan* plan = nullptr;
  int64_t heads = 0, dim = 0;
  bool identity = true;
  std::vector<T> copy;

  LogicalTensor(const BHND& s, const TilePlan& p, int64_t batch, int64_t h, int64_t d)
      : src(&s), plan(&p), heads(h), dim(d) {
    for (int64_t l = 0; l < p.seq && identity; ++l) identity = p.order[l] == l;
    if (!identity) copy.resize(static_cast<size_t>(batch * h * p.seq * d));
  }
  // Fills the copy of head bh (call once per head, from any thread).
  void fill(int64_t bh) {
    if (identity) return;
    const int64_t b = bh / heads, h = bh % heads, n = plan->seq;
    T* dst = copy.data() + bh * n * dim;
    for (int64_t l = 0; l < n; ++l) {
      const T* r = src->row<const T>(b, h, plan->order[l]);
      std::copy(r, r + dim, dst + l * dim);
    }
  }
  LogicalRows<T> head(int64_t bh) const {
    if (identity) return {src->row<const T>(bh / heads, bh % heads, 0), src->sn};
    return {copy.data() + bh * plan->seq * dim, dim};
  }
};

// Rows idx[0..ne) of `rows` as a (kChunk, D) operand with row stride *ld: a pointer into the
// rows when they are kChunk consecutive ones, else a zero-padded gather into buf.
template <class T>
DF_ALWAYS_INLINE const T* chunk_rows(const LogicalRows<T>& rows, const int32_t* idx, int64_t ne, int64_t D,
                                     T* buf, int64_t* ld) {
  if (ne == kChunk && idx[kChunk - 1] - idx[0] == kChunk - 1) {
    *ld = rows.stride;
    return rows.row(idx[0]);
  }
  for (int64_t j = 0; j < kChunk; ++j) {
    if (j < ne) {
      const T* r = rows.row(idx[j]);
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = r[d];
    } else {
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = T(0);
    }
  }
  *ld = D;
  return buf;
}

// st is (kChunk, kTile): entry j, tile row i. Sets st[j][i] = -inf where bit j of words[i] is 0.
template <class T>
DF_ALWAYS_INLINE void mask_chunk(T* st, const uint64_t* words) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < kChunk; ++j)
    for (int64_t i = 0; i < kTile; ++i) st[j * kTile + i] = ((words[i] >> j) & 1u) ? st[j * kTile + i] : ninf;
}

// (D, kTile) transpose of a tile's rows (physical positions pos[0..rows)), times `mul`; zero-padded.
template <class T>
DF_ALWAYS_INLINE void pack_tile_transposed(const BHND& src, int64_t b, int64_t h, const int64_t* pos, int64_t rows,
                                           int64_t D, T mul, T* out) {
  for (int64_t i = 0; i < kTile; ++i) {
    const T* r = i < rows ? src.row<const T>(b, h, pos[i]) : nullptr;
    for (int64_t d = 0; d < D; ++d) out[d * kTile + i] = r ? r[d] * mul : T(0);
  }
}

}  // namespace dalle_fast::cpu
