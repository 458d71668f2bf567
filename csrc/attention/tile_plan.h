// How the kernels cut one head's [N, N] mask into tiles: which keys each query tile must visit
// and which queries each key tile must visit, in chunks of `tile` entries with a bit mask per
// row. The plan depends only on the mask and the tile size (the CPU kernels use 32, the CUDA
// tensor-core kernels 64), not on batch or head, so it is built once and cached.
//
// Everything here is in *logical* positions: order[l] is the physical position of logical
// position l. Column layers order their image positions column-major (a column's queries and
// keys become contiguous); every other kind uses the identity.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../masks.h"

namespace dalle_fast {

constexpr int64_t kMaxTile = 64;  // a chunk's bit mask per row is one uint64

// For each tile, the sorted union of what its rows reach, cut into chunks of `tile` entries;
// for each chunk, one word per tile row whose bit j says whether the row reaches entry j.
struct TileLists {
  std::vector<int64_t> start;        // tile t owns entries [start[t], start[t+1]) of `index`
  std::vector<int32_t> index;        // logical positions
  std::vector<int64_t> chunk_start;  // tile t owns chunks [chunk_start[t], chunk_start[t+1])
  std::vector<uint64_t> words;       // chunk c, row i: words[c * tile + i]
  std::vector<uint8_t> full;         // chunk c: every row reaches every entry (no masking needed)
};

struct TilePlan {
  int64_t seq = 0;
  int64_t tile = 0;            // rows per tile = entries per chunk
  std::vector<int64_t> order;  // logical -> physical position
  TileLists keys;              // per query tile: the keys its queries see
  TileLists queries;           // per key tile: the queries that see its keys

  int64_t num_tiles() const { return (seq + tile - 1) / tile; }
};

// Thread-safe; returns the cached plan for this mask and tile size (1 <= tile <= kMaxTile).
std::shared_ptr<const TilePlan> get_tile_plan(const MaskSpec& mask, int64_t tile);

}  // namespace dalle_fast
