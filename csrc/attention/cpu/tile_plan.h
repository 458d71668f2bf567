// How the CPU kernels cut one head's [N, N] mask into tiles: which keys each query tile must
// visit and which queries each key tile must visit, in chunks of 32 with a bit mask per row.
// The plan depends only on the mask, not on batch or head, so it is built once and cached.
//
// Everything here is in *logical* positions: order[l] is the physical position of logical
// position l. Column layers order their image positions column-major (a column's queries and
// keys become contiguous); every other kind uses the identity.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../../masks.h"

namespace dalle_fast::cpu {

constexpr int64_t kTile = 32;   // rows per query tile and per key tile
constexpr int64_t kChunk = 32;  // keys (or queries) per inner step: one bit each in a uint32

// For each tile, the sorted union of what its rows reach, cut into chunks of kChunk entries;
// for each chunk, one word per tile row whose bit j says whether the row reaches entry j.
struct TileLists {
  std::vector<int64_t> start;        // tile t owns entries [start[t], start[t+1]) of `index`
  std::vector<int32_t> index;        // logical positions
  std::vector<int64_t> chunk_start;  // tile t owns chunks [chunk_start[t], chunk_start[t+1])
  std::vector<uint32_t> words;       // chunk c, row i: words[c * kTile + i]
  std::vector<uint8_t> full;         // chunk c: every row reaches every entry (no masking needed)
};

struct TilePlan {
  int64_t seq = 0;
  std::vector<int64_t> order;  // logical -> physical position
  TileLists keys;              // per query tile: the keys its queries see
  TileLists queries;           // per key tile: the queries that see its keys

  int64_t num_tiles() const { return (seq + kTile - 1) / kTile; }
};

// Thread-safe; returns the cached plan for this mask.
std::shared_ptr<const TilePlan> get_tile_plan(const MaskSpec& mask);

}  // namespace dalle_fast::cpu
