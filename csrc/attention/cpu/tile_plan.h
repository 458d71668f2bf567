// How the CPU kernels cut one head's [N, N] mask into tiles: which keys each query tile must
// visit and which queries each key tile must visit. The plan depends only on the mask, not on
// batch or head, so it is built once per mask and cached.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../../masks.h"

namespace dalle_fast::cpu {

struct TilePlan {
  int64_t tile = 0;            // query rows per query tile = key rows per key tile
  std::vector<int64_t> order;  // logical -> physical position; a tile is `tile` consecutive entries

  // CSR lists, sorted ascending by physical position: the union over a tile's rows of what
  // they may see (keys for a query tile, queries for a key tile).
  std::vector<int64_t> key_start;
  std::vector<int32_t> keys;
  std::vector<int64_t> query_start;
  std::vector<int32_t> queries;

  // For an image query and image key, allowed iff image_ok[g - g'] (see masks.h).
  std::vector<uint8_t> image_ok;
  int64_t text_len = 0;

  int64_t num_tiles() const { return (static_cast<int64_t>(order.size()) + tile - 1) / tile; }

  bool allowed(int64_t q, int64_t k) const {
    if (k > q) return false;
    if (k < text_len) return true;
    return image_ok[static_cast<size_t>(q - k)] != 0;
  }
};

// Thread-safe; returns the cached plan for this mask and tile size.
std::shared_ptr<const TilePlan> get_tile_plan(const MaskSpec& mask, int64_t tile);

}  // namespace dalle_fast::cpu
