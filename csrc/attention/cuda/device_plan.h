// A TilePlan (../tile_plan.h) copied to a CUDA device, for the tensor-core kernels.
//
// The copy is made once per (mask, tile size, device) and cached for the life of the process,
// so only the first call with a new mask copies (and waits for the copy); every later call only
// reads the cached pointers. Capture a CUDA graph after such a first (warm-up) call.
#pragma once

#include <cstdint>

#include "../../masks.h"
#include "plan_view.h"

namespace dalle_fast::cuda {

PlanView device_plan(const MaskSpec& mask, int64_t tile, int device);

}  // namespace dalle_fast::cuda
