#include "tile_plan.h"

#include <algorithm>
#include <stdexcept>
#include <map>
#include <mutex>
#include <tuple>

namespace dalle_fast {

namespace {

std::vector<int64_t> logical_order(const MaskSpec& m) {
  const int64_t T = m.text_len, S = m.grid;
  std::vector<int64_t> order(static_cast<size_t>(m.seq_len()));
  for (int64_t p = 0; p < T; ++p) order[p] = p;
  for (int64_t i = 0; i < S * S; ++i) order[T + i] = m.kind == MaskKind::Column ? T + (i % S) * S + i / S : T + i;
  return order;
}

// rows_see(row_pos, entry_pos) is the mask between a tile row and a list entry (physical).
template <class Runs, class Sees>
TileLists build_lists(const MaskSpec& m, const std::vector<int64_t>& order, const int64_t kTile, Runs runs,
                      Sees sees) {
  const int64_t n = m.seq_len();
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<int64_t> logical(static_cast<size_t>(n));
  for (int64_t l = 0; l < n; ++l) logical[order[l]] = l;
  std::vector<int64_t> stamp(static_cast<size_t>(n), -1);
  std::vector<int32_t> found;
  TileLists lists;
  lists.start.assign(1, 0);
  lists.chunk_start.assign(1, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    found.clear();
    const int64_t r0 = t * kTile, rows = std::min(kTile, n - r0);
    for (int64_t i = 0; i < rows; ++i) {
      runs(m, order[r0 + i], [&](int64_t lo, int64_t hi, int64_t step) {
        for (int64_t x = lo; x < hi; x += step) {
          if (stamp[x] != t) {
            stamp[x] = t;
            found.push_back(static_cast<int32_t>(logical[x]));
          }
        }
      });
    }
    std::sort(found.begin(), found.end());
    const int64_t entries = static_cast<int64_t>(found.size());
    for (int64_t c0 = 0; c0 < entries; c0 += kTile) {
      const int64_t ne = std::min(kTile, entries - c0);
      bool full = true;
      for (int64_t i = 0; i < kTile; ++i) {
        uint64_t word = 0;
        if (i < rows)
          for (int64_t j = 0; j < ne; ++j)
            if (sees(order[r0 + i], order[found[c0 + j]])) word |= uint64_t(1) << j;
        const uint64_t want = i < rows ? (ne == 64 ? ~uint64_t(0) : (uint64_t(1) << ne) - 1) : 0;
        full = full && word == want;
        lists.words.push_back(word);
      }
      // A partial chunk is never full: its padding entries must be masked.
      lists.full.push_back(full && ne == kTile ? 1 : 0);
    }
    lists.index.insert(lists.index.end(), found.begin(), found.end());
    lists.start.push_back(static_cast<int64_t>(lists.index.size()));
    lists.chunk_start.push_back(static_cast<int64_t>(lists.full.size()));
  }
  return lists;
}

std::shared_ptr<const TilePlan> build_plan(const MaskSpec& m, const int64_t tile) {
  auto plan = std::make_shared<TilePlan>();
  plan->seq = m.seq_len();
  plan->tile = tile;
  plan->order = logical_order(m);
  plan->keys = build_lists(
      m, plan->order, tile, [](const MaskSpec& s, int64_t q, auto&& f) { for_each_key_run(s, q, f); },
      [&](int64_t q, int64_t k) { return allowed(m, q, k); });
  plan->queries = build_lists(
      m, plan->order, tile, [](const MaskSpec& s, int64_t k, auto&& f) { for_each_query_run(s, k, f); },
      [&](int64_t k, int64_t q) { return allowed(m, q, k); });
  return plan;
}

}  // namespace

std::shared_ptr<const TilePlan> get_tile_plan(const MaskSpec& m, const int64_t tile) {
  if (tile < 1 || tile > kMaxTile) throw std::invalid_argument("get_tile_plan: tile must be in 1..64");
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

}  // namespace dalle_fast
