// The global-memory traffic of the emulated kernels, counted in the traffic build (build.py
// --sanitize traffic; elsewhere nothing is counted and traffic_counted() is false).
//
// There the kernels' translation units are compiled with every load and store outlined into a
// call (GCC's -fsanitize=kernel-address with asan-instrumentation-with-call-threshold=0), and
// emu_traffic.cpp's hooks count the accesses that fall inside a watched buffer (the checks'
// device buffers): per byte, how many times the kernels loaded and stored it, and per warp
// request, the 32-byte sectors it touched. A request is one instruction of one warp: the accesses
// of its lanes at the same code address, the n-th time each lane passes it. Consecutive requests
// of a warp that touch the same sectors count once (a 16-byte vector access the host compiler
// splits into scalar ones, or cp.async's byte copies), as the GPU's L1 would serve them.
//
// What it says: whether a kernel reads each input byte as often as its design says (the one-read
// Gumbel kernels once), which bytes it touches (decode: only the keys its mask allows), and how
// much of each sector a request uses (coalescing). What it cannot: L2 hits between requests, so
// the DRAM traffic of re-reads, and time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace emu {

struct Traffic {
  size_t bytes = 0;                 // of the buffer, or of the range asked for
  size_t loaded = 0, stored = 0;    // bytes loaded and stored, with repeats
  size_t loaded_once = 0;           // distinct bytes loaded
  size_t stored_once = 0;           // distinct bytes stored
  size_t max_loads = 0, max_stores = 0;  // the most loads / stores of one byte
  size_t sectors = 0;               // 32-byte sectors the warp requests touched (loads and stores)
  size_t used = 0;                  // bytes of those sectors the requests asked for
  double sector_use() const { return sectors == 0 ? 1.0 : double(used) / (32.0 * double(sectors)); }
};

bool traffic_counted();
// A device buffer of the checks: its accesses by kernels are counted from now until unwatch.
void watch(const void* p, size_t bytes);
void unwatch(const void* p);
// The counts of the buffer starting at p since it was watched.
Traffic traffic(const void* p);
// Those of its bytes [offset, offset + n) alone, without sectors (they count whole requests).
Traffic traffic_in(const void* p, size_t offset, size_t n);

// The runtime's side: the running thread's warp (a number unique in this process, its launch's
// number in the bits from 44 up) and lane; false outside a kernel.
bool current_warp(uint64_t* warp, int* lane);

}  // namespace emu
