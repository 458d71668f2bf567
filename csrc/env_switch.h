// The environment switches of our kernels (DALLE_FAST_FLASH, DALLE_FAST_DECODE_FAST,
// DALLE_FAST_GUMBEL_RESIDENT, DALLE_FAST_LINEAR_AVX512): whether a variable is set to a given
// value. Each caller chooses whether to read it once per process or at every call.
#pragma once

#include <cstdlib>
#include <cstring>

namespace dalle_fast {

inline bool env_is(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

}  // namespace dalle_fast
