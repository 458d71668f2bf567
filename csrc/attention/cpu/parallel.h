// Dynamic scheduling on torch's intra-op thread pool: tiles differ a lot in cost (text tiles
// are short, image tiles see all text keys), so threads take work items one at a time.
#pragma once

#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace dalle_fast::cpu {

// Calls init() once per participating thread to get its state, then work(state, i) for every i
// in [0, n), each exactly once.
template <class Init, class Work>
void parallel_dynamic(int64_t n, Init&& init, Work&& work) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      auto state = init();
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) work(state, i);
    }
  });
}

}  // namespace dalle_fast::cpu
