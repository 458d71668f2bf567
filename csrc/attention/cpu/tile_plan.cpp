#include "tile_plan.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace dalle_fast::cpu {

namespace {

// Column layers see their own column only, so their image tiles run down columns (the
// transposed, column-major order); every other kind is a band in raster order.
std::vector<int64_t> logical_order(const MaskSpec& m) {
  const int64_t T = m.text_len, S = m.grid;
  std::vector<int64_t> order(static_cast<size_t>(m.seq_len()));
  for (int64_t p = 0; p < T; ++p) order[p] = p;
  for (int64_t i = 0; i < S * S; ++i) {
    order[T + i] = m.kind == MaskKind::Column ? T + (i % S) * S + i / S : T + i;
  }
  return order;
}

// For each tile of `order`, the sorted union of what its positions reach through `runs`.
template <class Runs>
void build_lists(const MaskSpec& m, const std::vector<int64_t>& order, int64_t tile, Runs runs,
                 std::vector<int64_t>& start, std::vector<int32_t>& out) {
  const int64_t n = m.seq_len();
  const int64_t tiles = (n + tile - 1) / tile;
  std::vector<int64_t> stamp(static_cast<size_t>(n), -1);
  std::vector<int32_t> found;
  start.assign(1, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    found.clear();
    for (int64_t i = t * tile; i < std::min(n, (t + 1) * tile); ++i) {
      runs(m, order[i], [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t x = lo; x < hi; x += step) {
          if (stamp[x] != t) {
            stamp[x] = t;
            found.push_back(static_cast<int32_t>(x));
          }
        }
      });
    }
    std::sort(found.begin(), found.end());
    out.insert(out.end(), found.begin(), found.end());
    start.push_back(static_cast<int64_t>(out.size()));
  }
}

std::shared_ptr<const TilePlan> build_plan(const MaskSpec& m, int64_t tile) {
  auto plan = std::make_shared<TilePlan>();
  plan->tile = tile;
  plan->text_len = m.text_len;
  plan->order = logical_order(m);
  build_lists(m, plan->order, tile,
              [](const MaskSpec& s, int64_t q, auto&& f) { for_each_key_run(s, q, f); },
              plan->key_start, plan->keys);
  build_lists(m, plan->order, tile,
              [](const MaskSpec& s, int64_t k, auto&& f) { for_each_query_run(s, k, f); },
              plan->query_start, plan->queries);
  plan->image_ok.resize(static_cast<size_t>(m.image_len()));
  for (int64_t d = 0; d < m.image_len(); ++d) plan->image_ok[d] = image_offset_allowed(m, d) ? 1 : 0;
  return plan;
}

}  // namespace

std::shared_ptr<const TilePlan> get_tile_plan(const MaskSpec& m, int64_t tile) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const TilePlan>> cache;
  const int64_t half = m.kind == MaskKind::Conv ? m.half : 0;
  const Key key{static_cast<int>(m.kind), m.text_len, m.grid, half, tile};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 64) cache.clear();  // bounded: a model uses a handful of masks
  auto plan = build_plan(m, tile);
  cache.emplace(key, plan);
  return plan;
}

}  // namespace dalle_fast::cpu
