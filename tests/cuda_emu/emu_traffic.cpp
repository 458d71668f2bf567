// The traffic counter of include/emu_traffic.h. Built with EMU_TRAFFIC (the traffic build), it
// defines the hooks GCC's outlined kernel-address instrumentation calls for every access of the
// kernels' translation units; without it, it only keeps the (empty) interface.
#include "emu_traffic.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <unordered_map>
#include <vector>

namespace emu {
[[noreturn]] void fault(const char* what);

namespace {

struct Watched {
  uintptr_t end;
  std::vector<uint32_t> loads, stores;  // per byte
};
std::map<uintptr_t, Watched> g_watched;  // by first byte

// A warp's accesses at code address pc: of one lane (n: the lane), or one request (n: the pass,
// the n-th time each lane got there).
struct Key {
  uint64_t warp;
  uintptr_t pc;
  uint32_t n;
  bool store;
  bool operator==(const Key& o) const { return warp == o.warp && pc == o.pc && n == o.n && store == o.store; }
};
struct Hash {
  static size_t mix(uint64_t h, uint64_t v) { return size_t((h ^ v) * 0x9e3779b97f4a7c15ull + (h >> 29)); }
  size_t operator()(const Key& k) const { return mix(mix(mix(k.warp, k.pc), k.n), k.store); }
};
struct Request {
  uint64_t first;   // order of the first access
  uintptr_t buffer;
  std::vector<std::pair<uintptr_t, uint32_t>> parts;  // (address, bytes)
};
std::unordered_map<Key, Request, Hash> g_requests;
std::unordered_map<Key, uint32_t, Hash> g_passes;  // of the launch g_launch
uint64_t g_launch = 0;
uint64_t g_seq = 0;

Watched* find(uintptr_t a, uintptr_t* begin) {
  auto it = g_watched.upper_bound(a);
  if (it == g_watched.begin()) return nullptr;
  --it;
  if (a >= it->second.end) return nullptr;
  *begin = it->first;
  return &it->second;
}

[[maybe_unused]] void access(uintptr_t a, size_t n, bool store, uintptr_t pc) {
  uintptr_t begin = 0;
  Watched* w = find(a, &begin);
  if (w == nullptr) return;
  uint64_t warp = 0;
  int lane = 0;
  if (!current_warp(&warp, &lane)) fault("host code accessed a device buffer");
  if (a + n > w->end) fault("an access runs past the end of a device buffer");
  auto& count = store ? w->stores : w->loads;
  for (size_t i = 0; i < n; ++i) ++count[a - begin + i];
  if (warp >> 44 != g_launch) g_passes.clear(), g_launch = warp >> 44;  // current_warp's launch number
  const uint32_t pass = g_passes[{warp, pc, uint32_t(lane), store}]++;
  Request& r = g_requests[{warp, pc, pass, store}];
  if (r.parts.empty()) r.first = g_seq++, r.buffer = begin;
  r.parts.emplace_back(a, uint32_t(n));
}

// The 32-byte sectors a group of accesses touches, sorted, each once.
std::vector<uintptr_t> sectors_of(const std::vector<std::pair<uintptr_t, uint32_t>>& parts) {
  std::vector<uintptr_t> sectors;
  for (const auto& [a, n] : parts)
    for (uintptr_t s = a / 32; s <= (a + n - 1) / 32; ++s) sectors.push_back(s);
  std::sort(sectors.begin(), sectors.end());
  sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
  return sectors;
}

// The distinct bytes a group of accesses asks for.
size_t bytes_of(std::vector<std::pair<uintptr_t, uint32_t>> parts) {
  std::sort(parts.begin(), parts.end());
  size_t used = 0;
  uintptr_t reach = 0;
  for (const auto& [a, n] : parts) {
    const uintptr_t from = std::max(a, reach), to = a + n;
    if (to > from) used += to - from;
    reach = std::max(reach, to);
  }
  return used;
}

}  // namespace

#if defined(EMU_TRAFFIC)
bool traffic_counted() { return true; }
#else
bool traffic_counted() { return false; }
#endif

void watch(const void* p, size_t bytes) {
  if (bytes == 0) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  g_watched[a] = Watched{a + bytes, std::vector<uint32_t>(traffic_counted() ? bytes : 0),
                         std::vector<uint32_t>(traffic_counted() ? bytes : 0)};
}

void unwatch(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  g_watched.erase(a);
  for (auto it = g_requests.begin(); it != g_requests.end();)  // a later buffer may take its place
    it = it->second.buffer == a ? g_requests.erase(it) : std::next(it);
}

Traffic traffic_in(const void* p, size_t offset, size_t n) {
  Traffic t;
  auto it = g_watched.find(reinterpret_cast<uintptr_t>(p));
  if (it == g_watched.end()) fault("traffic: not a watched buffer");
  const Watched& w = it->second;
  const size_t size = w.end - it->first;
  if (offset > size) fault("traffic: a range past the end of the buffer");
  t.bytes = std::min(n, size - offset);
  for (size_t i = offset; i < offset + t.bytes && i < w.loads.size(); ++i) {
    t.loaded += w.loads[i];
    t.stored += w.stores[i];
    t.loaded_once += w.loads[i] > 0;
    t.stored_once += w.stores[i] > 0;
    t.max_loads = std::max<size_t>(t.max_loads, w.loads[i]);
    t.max_stores = std::max<size_t>(t.max_stores, w.stores[i]);
  }
  return t;
}

Traffic traffic(const void* p) {
  Traffic t = traffic_in(p, 0, SIZE_MAX);
  const auto begin = reinterpret_cast<uintptr_t>(p);
  // The buffer's requests in each warp's order; a run of consecutive ones over the same sectors
  // counts as one.
  std::vector<std::pair<const Key*, const Request*>> mine;
  for (const auto& [k, r] : g_requests)
    if (r.buffer == begin) mine.emplace_back(&k, &r);
  std::sort(mine.begin(), mine.end(), [](const auto& a, const auto& b) {
    return a.first->warp != b.first->warp ? a.first->warp < b.first->warp : a.second->first < b.second->first;
  });
  // The run's sectors: those of each of its requests.
  std::vector<uintptr_t> run_sectors;
  std::vector<std::pair<uintptr_t, uint32_t>> run;
  const Key* run_key = nullptr;
  const auto close = [&] {
    if (run.empty()) return;
    t.sectors += run_sectors.size();
    t.used += bytes_of(run);
    run.clear();
  };
  for (const auto& [k, r] : mine) {
    std::vector<uintptr_t> sectors = sectors_of(r->parts);
    const bool same =
        run_key != nullptr && run_key->warp == k->warp && run_key->store == k->store && sectors == run_sectors;
    if (!same) close();
    run.insert(run.end(), r->parts.begin(), r->parts.end());
    run_key = k;
    run_sectors = std::move(sectors);
  }
  close();
  return t;
}

}  // namespace emu

#if defined(EMU_TRAFFIC)
// GCC's outlined kernel-address checks (the argument: the address; N: also the size).
#define EMU_HOOKS(n)                                                                                 \
  extern "C" void __asan_load##n##_noabort(uintptr_t a) {                                           \
    emu::access(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));             \
  }                                                                                                 \
  extern "C" void __asan_store##n##_noabort(uintptr_t a) {                                          \
    emu::access(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));              \
  }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) {
  emu::access(a, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) {
  emu::access(a, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __asan_handle_no_return() {}
#endif
