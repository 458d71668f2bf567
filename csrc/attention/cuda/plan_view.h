// Device pointers to one tile plan (see ../tile_plan.h), in 32-bit indices; plain data, so the
// .cu kernels take it by value without any torch or STL type.
#pragma once

#include <cstdint>

namespace dalle_fast::cuda {

struct PlanLists {
  const int32_t* start = nullptr;        // tile t owns entries [start[t], start[t+1]) of pos
  const int32_t* pos = nullptr;          // the entries' physical positions (order[] applied on upload)
  const int32_t* chunk_start = nullptr;  // tile t owns chunks [chunk_start[t], chunk_start[t+1])
  const uint64_t* words = nullptr;       // chunk c, tile row i: words[c * tile + i]
  const uint8_t* full = nullptr;         // chunk c needs no masking
};

struct PlanView {
  int32_t seq = 0, tile = 0, tiles = 0;
  const int32_t* order = nullptr;  // logical -> physical position
  PlanLists keys;                  // per query tile: the keys its queries see
  PlanLists queries;               // per key tile: the queries that see its keys
};

}  // namespace dalle_fast::cuda
