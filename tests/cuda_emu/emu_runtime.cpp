// The scheduler of the CPU emulation (see include/emu_device.h): every CUDA thread of a launch is a
// ucontext fiber on one OS thread; a cluster's blocks (one block without clusters) run together,
// clusters one after another. A fiber runs until it reaches a collective, where it waits, yielding,
// until its group (warp, block or cluster) has arrived; a full pass over the fibers in which no
// fiber arrives anywhere or exits is a deadlock and is reported with the places they wait at.
// EMU_SCHEDULE (below) makes the order random.
//
// Built with EMU_TSAN (this file itself uninstrumented, the kernels under ThreadSanitizer), it is
// a race check: each fiber is a ThreadSanitizer fiber, and the only happens-before edges between
// them are the ones CUDA guarantees: __syncthreads within a block, __syncwarp within a warp,
// cluster.sync within a cluster (warp shuffles and mma order nothing), and a launch's start and
// end for the host. So two threads touching the same global or shared bytes, one of them writing,
// with no barrier between, are reported, whatever order the fibers ran in, blocks and clusters
// included.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace emu {
namespace {

constexpr size_t kStack = 256 * 1024;
constexpr size_t kMaxSharedPerBlock = 232448;  // sm_90: 227 KiB, static and dynamic together
constexpr size_t kDefaultShared = 48 * 1024;    // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kSlot = 64;                    // bytes a lane can put into one warp exchange

// Two bytes of their own for a barrier's ThreadSanitizer sync addresses (never freed, so never
// reused by a later barrier); none without ThreadSanitizer.
inline char* sync_tokens() {
#if defined(EMU_TSAN)
  return new char[2];
#else
  return nullptr;
#endif
}

struct Barrier {
  // ThreadSanitizer's sync addresses, one per generation parity: a thread leaving round k must not
  // acquire what a faster thread released on arriving at round k + 1 (never freed: the barriers
  // of a launch's blocks are few).
  char* token = sync_tokens();
  int arrived = 0;
  uint64_t gen = 0;
  const char* site = nullptr;
};

struct Var {
  const void* key;
  unsigned char* base;  // the allocation (ptr is inside it: see shared_storage)
  unsigned char* ptr;
  size_t bytes;
  uint32_t address;  // in the block's shared window (__cvta_generic_to_shared)
};

constexpr uint32_t kDynamicAddress = 0x1000000;  // the dynamic memory's place in the shared window

struct Warp {
  int live = 0;
  Barrier bar;
  // Each lane's value of a warp collective, in two sets used alternately: a lane writes set
  // (its collective count) % 2, the warp meets once, and every lane reads the set. A lane cannot
  // write that set again before every lane has met it at the next collective, so after reading.
  alignas(16) unsigned char slot[2][32][kSlot];
};

struct Block {
  uint3 idx{};
  unsigned rank = 0;
  int live = 0;
  bool exited = false;  // all its threads have: its shared memory is gone
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<Var> vars;  // static __shared__ variables, in order of first use
  size_t static_bytes = 0;
  unsigned char* dyn = nullptr;  // dynamic shared memory
  size_t dyn_bytes = 0;
  Block() = default;
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() {
    for (Var& v : vars) free_shared(v.base, size_t(v.ptr - v.base) + v.bytes);
    free_shared(dyn, dyn_bytes);
  }
  // An exited block's shared memory: under AddressSanitizer, another block of the cluster reading
  // it (through a pointer mapped before) is reported, as a read of freed memory.
  void retire() {
    exited = true;
    for (Var& v : vars) poison(v.ptr, v.bytes);
    poison(dyn, dyn_bytes);
  }
  static void poison(void* p, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
    if (p != nullptr) ASAN_POISON_MEMORY_REGION(p, bytes);
#else
    (void)p, (void)bytes;
#endif
  }
  static void free_shared(void* p, size_t bytes) {
#if defined(__SANITIZE_ADDRESS__)
    if (p != nullptr) __asan_unpoison_memory_region(p, bytes > 0 ? bytes : 1);
#else
    (void)bytes;
#endif
    std::free(p);
  }
};

struct Thread {
  ucontext_t ctx;
  void* tsan_fiber = nullptr;
  uint3 tid{};
  Block* block = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  bool done = false;
  const char* waiting = nullptr;
  unsigned collectives = 0;  // warp collectives so far: which set of the warp's slots
  std::vector<AsyncCopy> copies;  // cp.async not yet done, oldest first
  std::vector<size_t> group_ends;  // the committed groups: copies [0, group_ends[0]), ...
  std::vector<AsyncCopy> taken;   // the copies a wait_group is doing
};

struct KernelInfo {
  size_t max_dynamic = 0;  // set by cudaFuncSetAttribute; 0: the default
  bool non_portable = false;
  size_t static_bytes = 0;  // seen in earlier launches
};

// The dynamic shared memory a launch of the kernel may take, with `static_bytes` of static.
size_t dynamic_allowed(const KernelInfo& info, size_t static_bytes) {
  if (info.max_dynamic > 0) return info.max_dynamic;
  return static_bytes < kDefaultShared ? kDefaultShared - static_bytes : 0;
}

struct Run {
  dim3 grid, block;
  size_t smem = 0;
  unsigned csize = 1;
  const void* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<std::unique_ptr<Block>> blocks;  // the cluster running now
  int cluster_live = 0;
  Barrier cluster_bar;
};

Thread* g_cur = nullptr;
ucontext_t g_sched;

// EMU_SCHEDULE=N (a seed): each pass over the fibers runs them in a random order, stalls a random
// half of the cluster's blocks and skips a quarter of the other threads, so that blocks and warps
// run ahead of each other as on a GPU. Unset: every thread in order, each pass.
const bool g_random_schedule = std::getenv("EMU_SCHEDULE") != nullptr;
std::mt19937_64 g_schedule_rng(g_random_schedule ? std::strtoull(std::getenv("EMU_SCHEDULE"), nullptr, 10) : 0);

// AddressSanitizer must be told of every switch between stacks (fibers and the scheduler's).
#if defined(__SANITIZE_ADDRESS__)
void* g_fake_sched = nullptr;
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
void to_fiber(const void* bottom) { __sanitizer_start_switch_fiber(&g_fake_sched, bottom, kStack); }
void back_in_scheduler() { __sanitizer_finish_switch_fiber(g_fake_sched, nullptr, nullptr); }
void to_scheduler(void** fake) { __sanitizer_start_switch_fiber(fake, g_sched_bottom, g_sched_size); }
void back_in_fiber(void* fake) { __sanitizer_finish_switch_fiber(fake, &g_sched_bottom, &g_sched_size); }
#else
void to_fiber(const void*) {}
void back_in_scheduler() {}
void to_scheduler(void**) {}
void back_in_fiber(void*) {}
#endif

// ThreadSanitizer's view: no switch between a fiber and the scheduler orders anything. A launch
// passes the host's writes (its inputs) to every thread through g_launch_begin, and the host
// takes every thread's writes at the launch's end through g_launch_end; between them only the
// barriers order threads (release on arrival, acquire on leaving), so threads of different
// blocks and clusters are concurrent, as on the GPU (cluster_slots: no thread inherits the
// history of the one that ran before it on its fiber).
#if defined(EMU_TSAN)
void* g_tsan_host = nullptr;
char g_launch_begin, g_launch_end;
// The fibers of a cluster's threads, each with its own stack (a fiber keeps its stack, so a
// stack's shadow only ever holds its own fiber's accesses). Consecutive clusters take them from
// alternate pools, so no two clusters in a row share a fiber (a fiber's earlier accesses are
// ordered before its later ones); a cluster too large for two pools under ThreadSanitizer's 8128
// threads gets all-new fibers and fresh stacks.
struct Slot {
  void* fiber = nullptr;
  void* stack = nullptr;
};
std::vector<Slot> g_pool[2];
int g_turn = 0;
constexpr size_t kPoolThreads = 4000;
void* new_stack(void* at);
Slot* cluster_slots(size_t n) {
  if (g_tsan_host == nullptr) g_tsan_host = __tsan_get_current_fiber();
  if (n <= kPoolThreads) {
    g_turn ^= 1;
  } else {
    for (auto& pool : g_pool)
      for (Slot& slot : pool)
        if (slot.fiber != nullptr) __tsan_destroy_fiber(slot.fiber), slot.fiber = nullptr;
  }
  auto& pool = g_pool[g_turn];
  if (pool.size() < n) pool.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (pool[i].fiber != nullptr) continue;
    pool[i].fiber = __tsan_create_fiber(0);
    pool[i].stack = new_stack(pool[i].stack);  // a destroyed fiber's stack: fresh memory, fresh shadow
  }
  return pool.data();
}
void tsan_enter(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
void tsan_leave() { __tsan_switch_to_fiber(g_tsan_host, __tsan_switch_to_fiber_no_sync); }
void tsan_release(const void* a) { __tsan_release(const_cast<void*>(a)); }
void tsan_acquire(const void* a) { __tsan_acquire(const_cast<void*>(a)); }
// Host-side writes ThreadSanitizer must not count as a thread's (allocating and freeing shared
// memory): scoped.
struct IgnoreWrites {
  IgnoreWrites() { AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }
  ~IgnoreWrites() { AnnotateIgnoreWritesEnd(__FILE__, __LINE__); }
};
#else
char g_launch_begin, g_launch_end;
struct IgnoreWrites {};
void tsan_enter(void*) {}
void tsan_leave() {}
void tsan_release(const void*) {}
void tsan_acquire(const void*) {}
#endif

// Byte copies and fills as plain loops: a call to memcpy / memset would be seen (and checked) by
// ThreadSanitizer as an access of the fiber running the scheduler's code.
void copy_bytes(void* dst, const void* src, size_t n) {
  auto* d = static_cast<volatile unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  for (size_t i = 0; i < n; ++i) d[i] = s[i];
}
void fill_bytes(void* dst, unsigned char v, size_t n) {
  auto* d = static_cast<volatile unsigned char*>(dst);
  for (size_t i = 0; i < n; ++i) d[i] = v;
}
Run* g_run = nullptr;
uint64_t g_launches = 0;  // launches begun
uint64_t g_events = 0;
int g_last_error = 0;
const void* g_last_kernel = nullptr;
std::map<const void*, KernelInfo> g_kernels;
std::vector<void*> g_stacks;

Thread& cur() {
  if (g_cur == nullptr) fault("device code called outside a kernel");
  return *g_cur;
}

void yield() {
  void* fake = nullptr;
  tsan_leave();
  to_scheduler(&fake);
  swapcontext(&g_cur->ctx, &g_sched);
  back_in_fiber(fake);
}

// sync: the barrier orders memory (block and cluster barriers), or only meets (warp exchanges).
void wait(Barrier& b, const int& live, const char* site, const char* kind, bool sync) {
  if (b.arrived == 0) {
    b.site = site;
  } else if (std::strcmp(b.site, site) != 0) {
    std::fprintf(stderr, "emu: %s: threads of one group wait at different places: %s and %s\n", kind, b.site,
                 site);
    fault("divergent barrier");
  }
  const uint64_t gen = b.gen;
  if (sync) tsan_release(b.token + (gen & 1));
  ++b.arrived;
  ++g_events;
  if (b.arrived >= live) {
    b.arrived = 0;
    ++b.gen;
  } else {
    g_cur->waiting = site;
    while (b.gen == gen) yield();
    g_cur->waiting = nullptr;
  }
  if (sync) tsan_acquire(b.token + (gen & 1));
}

void release_if_complete(Barrier& b, int live) {
  if (b.arrived > 0 && b.arrived >= live) {
    b.arrived = 0;
    ++b.gen;
  }
}

void exit_thread() {
  Thread& t = cur();
  if (t.warp->bar.arrived > 0)
    fault("a thread exits while the other lanes of its warp wait for it at a shuffle or mma (a full mask)");
  t.done = true;
  ++g_events;
  release_if_complete(t.warp->bar, --t.warp->live);
  release_if_complete(t.block->bar, --t.block->live);
  if (t.block->live == 0) t.block->retire();
  release_if_complete(g_run->cluster_bar, --g_run->cluster_live);
}

void fiber_main() {
  back_in_fiber(nullptr);
  tsan_acquire(&g_launch_begin);
  (*g_run->body)();
  exit_thread();
  tsan_release(&g_launch_end);
  tsan_leave();
  to_scheduler(nullptr);  // this fiber ends
  setcontext(&g_sched);
}

// A thread stack: new, or (at != nullptr) the same addresses mapped afresh.
void* new_stack(void* at) {
  void* s = mmap(at, kStack, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (at != nullptr ? MAP_FIXED : 0), -1, 0);
  if (s == MAP_FAILED) fault("out of memory for thread stacks");
  return s;
}

void* stack(size_t i) {
  while (g_stacks.size() <= i) g_stacks.push_back(new_stack(nullptr));
  return g_stacks[i];
}

// Exactly `bytes` (an access past them shows under AddressSanitizer), aligned.
unsigned char* allocate(size_t bytes, size_t align) {
  void* p = nullptr;
  if (posix_memalign(&p, align, bytes) != 0) fault("out of memory for shared memory");
  return static_cast<unsigned char*>(p);
}

unsigned threads_per_block(const dim3& b) { return b.x * b.y * b.z; }

// Runs the cluster whose first block has linear index `first`.
void run_cluster(Run& run, uint64_t first) {
  const unsigned nt = threads_per_block(run.block);
  const unsigned warps = (nt + 31) / 32;
  run.blocks.clear();
  run.cluster_live = 0;
  run.cluster_bar = Barrier{};
  std::vector<Thread> threads(size_t(run.csize) * nt);
#if defined(EMU_TSAN)
  Slot* const slots = cluster_slots(threads.size());
#endif
  for (unsigned r = 0; r < run.csize; ++r) {
    auto blk = std::make_unique<Block>();
    const uint64_t linear = first + r;
    blk->idx = {unsigned(linear % run.grid.x), unsigned(linear / run.grid.x % run.grid.y),
                unsigned(linear / (uint64_t(run.grid.x) * run.grid.y))};
    blk->rank = r;
    blk->live = int(nt);
    blk->warps = std::vector<Warp>(warps);
    for (unsigned w = 0; w < warps; ++w) blk->warps[w].live = int(std::min(32u, nt - 32 * w));
    if (run.smem > 0) {
      IgnoreWrites ignore;  // the host's allocation, made after the launch's begin: no thread's write
      blk->dyn = allocate(run.smem, 16);
      blk->dyn_bytes = run.smem;
      fill_bytes(blk->dyn, 0xff, run.smem);
    }
    for (unsigned i = 0; i < nt; ++i) {
      Thread& t = threads[size_t(r) * nt + i];
      t.tid = {i % run.block.x, i / run.block.x % run.block.y, i / (run.block.x * run.block.y)};
      t.block = blk.get();
      t.warp = &blk->warps[i / 32];
      t.lane = int(i % 32);
      const size_t k = size_t(r) * nt + i;
#if defined(EMU_TSAN)
      t.tsan_fiber = slots[k].fiber;
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = slots[k].stack;
#else
      getcontext(&t.ctx);
      t.ctx.uc_stack.ss_sp = stack(k);
#endif
      t.ctx.uc_stack.ss_size = kStack;
      t.ctx.uc_link = &g_sched;
      makecontext(&t.ctx, fiber_main, 0);
    }
    run.cluster_live += int(nt);
    run.blocks.push_back(std::move(blk));
  }
  size_t left = threads.size();
  bool full_pass = true;  // every thread gets a turn (always, unless the schedule is random)
  std::vector<size_t> order(threads.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<char> stalled(run.csize, 0);
  while (left > 0) {
    const uint64_t before = g_events;
    std::fill(stalled.begin(), stalled.end(), 0);
    if (g_random_schedule) {
      std::shuffle(order.begin(), order.end(), g_schedule_rng);
      if (!full_pass) {
        for (unsigned r = 0; r < run.csize; ++r) stalled[r] = g_schedule_rng() % 2;
        stalled[g_schedule_rng() % run.csize] = 0;
      }
    }
    for (size_t i : order) {
      Thread& t = threads[i];
      if (t.done) continue;
      if (!full_pass && (stalled[t.block->rank] || g_schedule_rng() % 4 == 0)) continue;
      g_cur = &t;
      threadIdx = t.tid;
      blockIdx = t.block->idx;
      to_fiber(t.ctx.uc_stack.ss_sp);
      tsan_enter(t.tsan_fiber);
      swapcontext(&g_sched, &t.ctx);
      back_in_scheduler();
      g_cur = nullptr;
      if (t.done) --left;
    }
    const bool progress = g_events != before;
    if (left > 0 && !progress && !full_pass) {
      full_pass = true;  // nothing moved among the threads that ran: give every thread a turn
      continue;
    }
    full_pass = !g_random_schedule;
    if (left > 0 && !progress) {
      std::map<std::string, int> at;
      for (const Thread& t : threads)
        if (!t.done) ++at[t.waiting != nullptr ? t.waiting : "?"];
      std::fprintf(stderr, "emu: deadlock in cluster of block %llu; threads waiting:\n", (unsigned long long)first);
      for (const auto& [site, n] : at) std::fprintf(stderr, "  %d at %s\n", n, site.c_str());
      fault("deadlock");
    }
  }
  // The limits the driver checks at launch, now that the kernel's static shared memory is known.
  KernelInfo& info = g_kernels[run.kernel];
  for (const auto& blk : run.blocks) {
    info.static_bytes = std::max(info.static_bytes, blk->static_bytes);
    const size_t allowed = dynamic_allowed(info, blk->static_bytes);
    if (blk->static_bytes > kDefaultShared) fault("more than 48 KiB of static shared memory");
    if (run.smem > allowed || blk->static_bytes + run.smem > kMaxSharedPerBlock) {
      std::fprintf(stderr, "emu: static %zu + dynamic %zu bytes of shared memory; dynamic allowed: %zu\n",
                   blk->static_bytes, run.smem, allowed);
      fault("the launch would fail: too much shared memory");
    }
  }
  // Freeing the cluster's blocks and threads (their cp.async queues were grown by the threads):
  // the host's, not a write ThreadSanitizer should order against the threads'.
  IgnoreWrites ignore;
  run.blocks.clear();
  std::vector<Thread>().swap(threads);
}

}  // namespace

void fault(const char* what) {
  if (g_cur != nullptr) {
    const Thread& t = *g_cur;
    std::fprintf(stderr, "emu: device fault in block (%u,%u,%u) thread (%u,%u,%u): %s\n", t.block->idx.x,
                 t.block->idx.y, t.block->idx.z, t.tid.x, t.tid.y, t.tid.z, what);
  } else {
    std::fprintf(stderr, "emu: fault: %s\n", what);
  }
  std::fflush(stderr);
  std::abort();
}

void unsupported_asm(const char* text) {
  std::fprintf(stderr, "emu: inline PTX not emulated: %s\n", text);
  fault("unsupported asm");
}

int lane_id() { return cur().lane; }

bool current_warp(uint64_t* warp, int* lane) {
  if (g_cur == nullptr) return false;
  const Thread& t = *g_cur;
  const uint3 b = t.block->idx;
  const uint64_t linear = b.x + uint64_t(g_run->grid.x) * (b.y + uint64_t(g_run->grid.y) * b.z);
  *warp = (g_launches << 44) | (linear << 5) | uint64_t(t.warp - t.block->warps.data());
  *lane = t.lane;
  return true;
}
unsigned cluster_rank() { return cur().block->rank; }
unsigned cluster_blocks() {
  cur();
  return g_run->csize;
}

void launch_bounds(unsigned max_threads) {
  cur();
  if (threads_per_block(g_run->block) > max_threads)
    fault("a block of more threads than the kernel's __launch_bounds__ (the launch would fail)");
}

void sync_block(const char* site) {
  Block& b = *cur().block;
  wait(b.bar, b.live, site, "__syncthreads", true);
}

void sync_cluster(const char* site) {
  cur();
  wait(g_run->cluster_bar, g_run->cluster_live, site, "cluster.sync", true);
}

void sync_warp(const char* site, unsigned mask) {
  Thread& t = cur();
  if (mask != 0xffffffffu) fault("__syncwarp: only the full mask is emulated");
  if (t.warp->live != 32) fault("__syncwarp with a full mask, but not all 32 lanes of the warp are running");
  wait(t.warp->bar, t.warp->live, site, "__syncwarp", true);
}

namespace {
// A warp collective: the lane puts its `bytes` into the warp's slot set of this collective, the
// whole warp meets, and the set (every lane's bytes) is returned for reading.
using Slots = unsigned char[32][kSlot];
const Slots& meet(const void* in, size_t bytes, const char* site, const char* kind) {
  Thread& t = cur();
  Warp& w = *t.warp;
  if (w.live != 32) fault("warp collective with a full mask, but not all 32 lanes of the warp are running");
  if (bytes > kSlot) fault("warp collective: value too large");
  auto& slot = w.slot[t.collectives++ % 2];
  copy_bytes(slot[t.lane], in, bytes);
  wait(w.bar, w.live, site, kind, false);
  return slot;
}
}  // namespace

void warp_exchange(const void* in, void* out, size_t bytes, int src, unsigned mask, const char* site) {
  if (mask != 0xffffffffu) fault("warp exchange: only the full mask is emulated");
  copy_bytes(out, meet(in, bytes, site, "warp exchange")[src], bytes);
}

namespace {
float half_at(uint32_t reg, int hi, F16Tag) { return __half2float(__half{uint16_t(hi ? reg >> 16 : reg & 0xffff)}); }
float half_at(uint32_t reg, int hi, Bf16Tag) {
  return __bfloat162float(__nv_bfloat16{uint16_t(hi ? reg >> 16 : reg & 0xffff)});
}
struct MmaLane {
  uint32_t a[4], b[2];
};
}  // namespace

template <class Tag>
void mma_m16n8k16(float& c0, float& c1, float& c2, float& c3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                  uint32_t b0, uint32_t b1) {
  const Thread& t = cur();
  const MmaLane mine{{a0, a1, a2, a3}, {b0, b1}};
  const Slots& slot = meet(&mine, sizeof mine, "mma.sync", "mma.sync");
  MmaLane all[32];
  for (int l = 0; l < 32; ++l) copy_bytes(&all[l], slot[l], sizeof(MmaLane));
  // A (16 x 16, row): row r, column k sits in lane (r % 8) * 4 + (k % 8) / 2, register
  // (r >= 8) + 2 (k >= 8), half k % 2. B (16 x 8, col): row k, column n in lane n * 4 + (k % 8) / 2,
  // register k >= 8, half k % 2. C, D: lane's rows g and g + 8, columns 2 (lane % 4) + {0, 1}.
  const auto A = [&](int r, int k) {
    return half_at(all[(r % 8) * 4 + (k % 8) / 2].a[(r >= 8) + 2 * (k >= 8)], k % 2, Tag{});
  };
  const auto B = [&](int k, int n) { return half_at(all[n * 4 + (k % 8) / 2].b[k >= 8], k % 2, Tag{}); };
  const int g = t.lane / 4, c = 2 * (t.lane % 4);
  float* d[4] = {&c0, &c1, &c2, &c3};
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = c + (i % 2);
    float acc = *d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    *d[i] = acc;
  }
}
template void mma_m16n8k16<F16Tag>(float&, float&, float&, float&, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t,
                                   uint32_t);
template void mma_m16n8k16<Bf16Tag>(float&, float&, float&, float&, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t,
                                    uint32_t);

void* shared_storage(const void* key, size_t bytes, size_t align) {
  Block& b = *cur().block;
  // The first thread to pass the declaration allocates the variable; ThreadSanitizer must not count
  // that as its write (the fill below is uninstrumented).
  for (const Var& v : b.vars)
    if (v.key == key) return v.ptr;
  // At exactly `align` (not 2 align) below 16 bytes: see shared_var.
  const size_t skew = align < 16 ? align : 0;
  unsigned char* base = nullptr;
  {
    IgnoreWrites ignore;
    base = allocate(bytes + skew, align < 16 ? 16 : align);
  }
  unsigned char* p = base + skew;
  fill_bytes(p, 0xff, bytes);
  b.vars.push_back({key, base, p, bytes, uint32_t(16 + b.static_bytes + skew)});
  b.static_bytes += (skew + bytes + 15) / 16 * 16;
  return p;
}

void* dynamic_shared_storage() {
  Block& b = *cur().block;
  if (b.dyn == nullptr) fault("extern __shared__ used by a launch without dynamic shared memory");
  return b.dyn;
}

uint32_t shared_address(const void* p) {
  const Block& b = *cur().block;
  const auto* q = static_cast<const unsigned char*>(p);
  for (const Var& v : b.vars)
    if (q >= v.ptr && q < v.ptr + v.bytes) return v.address + uint32_t(q - v.ptr);
  if (b.dyn != nullptr && q >= b.dyn && q < b.dyn + b.dyn_bytes) return kDynamicAddress + uint32_t(q - b.dyn);
  fault("__cvta_generic_to_shared: not an address of this block's shared memory");
}

void* shared_pointer(uint32_t address) {
  const Block& b = *cur().block;
  for (const Var& v : b.vars)
    if (address >= v.address && address < v.address + v.bytes) return v.ptr + (address - v.address);
  if (b.dyn != nullptr && address >= kDynamicAddress && address < kDynamicAddress + b.dyn_bytes)
    return b.dyn + (address - kDynamicAddress);
  fault("shared memory address outside every shared variable of the block");
}

void cp_async_enqueue(uint32_t dst, const void* src, int bytes, int src_bytes) {
  Thread& t = cur();
  void* d = shared_pointer(dst);
  if (reinterpret_cast<uintptr_t>(d) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    fault("cp.async: source or destination not aligned to the copy size");
  shared_pointer(dst + uint32_t(bytes) - 1);  // the whole destination lies in one variable
  t.copies.push_back({d, src, bytes, src_bytes});
}

void cp_async_commit() {
  Thread& t = cur();
  t.group_ends.push_back(t.copies.size());
}

size_t cp_async_take(int keep, const AsyncCopy** out) {
  Thread& t = cur();
  const int done = int(t.group_ends.size()) - keep;
  t.taken.clear();
  if (done > 0) {
    const size_t n = t.group_ends[size_t(done - 1)];
    t.taken.assign(t.copies.begin(), t.copies.begin() + long(n));
    t.copies.erase(t.copies.begin(), t.copies.begin() + long(n));
    t.group_ends.erase(t.group_ends.begin(), t.group_ends.begin() + done);
    for (size_t& e : t.group_ends) e -= n;
  }
  *out = t.taken.data();
  return t.taken.size();
}

void warp_allgather(const void* in, void* all, size_t bytes, const char* site) {
  const Slots& slot = meet(in, bytes, site, "warp collective");
  for (int l = 0; l < 32; ++l) copy_bytes(static_cast<unsigned char*>(all) + size_t(l) * bytes, slot[l], bytes);
}

void* map_shared(const void* p, unsigned rank, size_t bytes) {
  Block& self = *cur().block;
  if (rank >= g_run->csize) fault("map_shared_rank: rank outside the cluster");
  Block& other = *g_run->blocks[rank];
  if (other.exited) fault("map_shared_rank: that block of the cluster has exited (its shared memory is gone)");
  if (rank != self.rank && g_run->cluster_bar.gen == 0)
    fault("map_shared_rank: another block's shared memory before any cluster.sync (it may not have started)");
  const auto* q = static_cast<const unsigned char*>(p);
  for (const Var& v : self.vars) {
    if (q >= v.ptr && q + bytes <= v.ptr + v.bytes) {
      for (const Var& o : other.vars)
        if (o.key == v.key) return o.ptr + (q - v.ptr);
      fault("map_shared_rank: the other block has not declared that variable yet");
    }
  }
  if (self.dyn != nullptr && q >= self.dyn && q + bytes <= self.dyn + g_run->smem) return other.dyn + (q - self.dyn);
  fault("map_shared_rank: not the address of this block's shared memory");
}

const void* last_kernel() { return g_last_kernel; }

void set_last_error(int err) {
  if (g_last_error == 0) g_last_error = err;
}
int take_last_error() {
  const int e = g_last_error;
  g_last_error = 0;
  return e;
}
int peek_last_error() { return g_last_error; }

int sms() {
  const char* s = std::getenv("EMU_SMS");
  return s != nullptr && std::atoi(s) > 0 ? std::atoi(s) : 4;
}

int func_attributes(const void* kernel, cudaFuncAttributes* attr) {
  const KernelInfo& info = g_kernels[kernel];
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = info.static_bytes;
  attr->maxDynamicSharedSizeBytes = int(dynamic_allowed(info, info.static_bytes));
  return cudaSuccess;
}

int func_set_attribute(const void* kernel, cudaFuncAttribute a, int value) {
  KernelInfo& info = g_kernels[kernel];
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) + info.static_bytes > kMaxSharedPerBlock) {
      set_last_error(cudaErrorInvalidValue);  // as CUDA: a failed runtime call is also the last error
      return cudaErrorInvalidValue;
    }
    info.max_dynamic = size_t(value);
    return cudaSuccess;
  }
  if (a == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    info.non_portable = value != 0;
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

unsigned cluster_of(const cudaLaunchConfig_t* cfg, int* err) {
  unsigned c = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id != cudaLaunchAttributeClusterDimension) continue;
    const auto& d = cfg->attrs[i].val.clusterDim;
    if (d.y != 1 || d.z != 1) *err = cudaErrorInvalidValue;  // not emulated
    c = d.x;
  }
  return c;
}

namespace {
// The checks of cudaLaunchKernelEx / cudaOccupancyMaxActiveClusters on a configuration.
int check_config(const void* kernel, dim3 grid, dim3 block, size_t smem, unsigned cluster) {
  const KernelInfo& info = g_kernels[kernel];
  const unsigned nt = threads_per_block(block);
  if (nt == 0 || nt > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  if (cluster == 0 || cluster > 16 || (cluster > 8 && !info.non_portable)) return cudaErrorInvalidValue;
  if (cluster > 1 && (grid.x % cluster != 0 || grid.y != 1 || grid.z != 1)) return cudaErrorInvalidValue;
  if (smem > dynamic_allowed(info, info.static_bytes)) return cudaErrorInvalidValue;
  return cudaSuccess;
}
}  // namespace

int max_active_clusters(const void* kernel, const cudaLaunchConfig_t* cfg, int* n) {
  int err = 0;
  const unsigned c = cluster_of(cfg, &err);
  if (err == 0) err = check_config(kernel, dim3(c), cfg->blockDim, cfg->dynamicSmemBytes, c);
  if (err != 0) return err;
  // EMU_MAX_CLUSTERS: a device that keeps fewer clusters resident (small GPCs), for the callers'
  // fallbacks; else as many as the SMs hold, at least one.
  const char* cap = std::getenv("EMU_MAX_CLUSTERS");
  *n = cap != nullptr ? std::atoi(cap) : std::max(1, sms() / int(c));
  return cudaSuccess;
}

int run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, unsigned cluster,
             const std::function<void()>& body) {
  if (g_run != nullptr) fault("a kernel launched from device code");
  const int err = check_config(kernel, grid, block, smem, cluster);
  if (err != cudaSuccess) return err;
  Run run;
  run.grid = grid;
  run.block = block;
  run.smem = smem;
  run.csize = cluster;
  run.kernel = kernel;
  run.body = &body;
  g_run = &run;
  ++g_launches;
  tsan_release(&g_launch_begin);
  blockDim = block;
  gridDim = grid;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t first = 0; first < blocks; first += cluster) run_cluster(run, first);
  tsan_acquire(&g_launch_end);
  g_run = nullptr;
  g_last_kernel = kernel;
  return cudaSuccess;
}

}  // namespace emu

uint3 threadIdx{}, blockIdx{};
dim3 blockDim, gridDim;
