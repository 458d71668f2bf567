// CPU emulation of the CUDA features our kernels use, for tests on machines without a GPU.
//
// translate.py rewrites the .cu sources into host C++ that includes this header (through the
// stand-in cuda_runtime.h of this folder): every CUDA thread of a launch becomes a fiber, the
// blocks of a thread-block cluster run together, and the collective operations (__syncthreads,
// warp shuffles, cluster.sync, mma.sync) are barriers among those fibers. What it checks: the
// kernels' indexing, predicates, barriers and cluster exchange, on real launch configurations
// (grid, block, cluster, shared memory limits). What it cannot: timing, the memory model beyond
// barriers, races between threads of one barrier interval, the hardware's exact rounding of exp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {

// A fault of the emulated device: prints where and aborts (as a device fault ends the context).
[[noreturn]] void fault(const char* what);

// ---- Collectives (each call is one barrier among its group) -------------------------------
// site: the call's "file:line", so that threads meeting at different barriers are reported.
void sync_block(const char* site);
void sync_cluster(const char* site);
// __syncwarp: the warp's barrier, ordering memory among its lanes (only the full mask is emulated).
void sync_warp(const char* site, unsigned mask = 0xffffffffu);
// The warp's exchange: every lane of the (full) warp writes `bytes` bytes, the warp meets, and each
// lane reads the ones lane `src` wrote. Aborts unless all 32 lanes take part (a full mask).
void warp_exchange(const void* in, void* out, size_t bytes, int src, unsigned mask, const char* site);
int lane_id();

// ---- Shared memory --------------------------------------------------------------------------
// The block's instance of a static __shared__ variable (key: the declaration), created filled with
// 0xff bytes (float NaN) at its first use, so a read before a write shows.
void* shared_storage(const void* key, size_t bytes, size_t align);
void* dynamic_shared_storage();
// The address in block `rank` of the cluster of the bytes at p (a shared variable of this block).
void* map_shared(const void* p, unsigned rank, size_t bytes);
unsigned cluster_rank();
unsigned cluster_blocks();

// Align: the declaration's alignas / __align__, 0 for none. The variable is placed at exactly
// max(Align, alignof(T)) bytes' alignment and not twice that (below 16), so a vector access a
// declaration does not align for is misaligned here (UBSan reports it) and not by luck aligned.
template <class T, int Id, size_t Align = 0>
T& shared_var() {
  static const char key = 0;
  constexpr size_t align = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(shared_storage(&key, sizeof(T), align));
}
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_storage());
}

// ---- Launch ---------------------------------------------------------------------------------
// Runs body once per thread of the grid, cluster by cluster; returns 0, or a launch error (the
// configuration is checked as the driver would).
int run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, unsigned cluster, const std::function<void()>& body);

template <class... Params, class... Args>
int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, unsigned cluster, Args&&... args) {
  std::function<void()> body = [kernel, tup = std::make_tuple(static_cast<std::decay_t<Params>>(args)...)]() {
    std::apply(kernel, tup);
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, cluster, body);
}
// A kernel's __launch_bounds__ (translate.py puts the call first in its body): a block of more
// threads faults, as the launch would fail on the GPU.
void launch_bounds(unsigned max_threads);
// The kernel of the last launch that ran (for a test to tell which kernel a launcher chose).
const void* last_kernel();
// A launch error for cudaGetLastError.
void set_last_error(int err);
// kernel<<<grid, block, smem, stream>>>(args...), as translate.py writes it.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, const void* /*stream*/,
                   Args&&... args) {
  const int err = launch(kernel, grid, block, smem, 1u, std::forward<Args>(args)...);
  if (err != 0) set_last_error(err);
}

// ---- Arithmetic -----------------------------------------------------------------------------
template <class To, class From>
inline To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
inline float ex2_approx_ftz(float x) {
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f * r : r;
}
// ---- Shared-memory addresses, cp.async, ldmatrix --------------------------------------------
// __cvta_generic_to_shared: a 32-bit address in the block's shared window (each variable and the
// dynamic memory at their own offsets), and back; a pointer outside shared memory faults.
uint32_t shared_address(const void* p);
void* shared_pointer(uint32_t address);
// cp.async: queued per thread in commit groups and done at cp.async.wait_group (by the inline
// code below, so that the sanitizers see the copies as the thread's): a read of the destination
// before the wait sees the old bytes, as on the GPU it may.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};
void cp_async_enqueue(uint32_t dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
// The copies of every group but the newest `keep`, removed from the queue: *out points at them.
size_t cp_async_take(int keep, const AsyncCopy** out);
// Every lane's `bytes` (<= 64) into all[lane] (the warp meets once, as in warp_exchange).
void warp_allgather(const void* in, void* all, size_t bytes, const char* site);

inline void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
  if (src_bytes < 0 || src_bytes > bytes) fault("cp.async: src-size outside [0, cp-size]");
  cp_async_enqueue(dst, src, bytes, src_bytes);
}
inline void cp_async_wait(int keep) {
  const AsyncCopy* c = nullptr;
  const size_t n = cp_async_take(keep, &c);
  for (size_t i = 0; i < n; ++i) {
    auto* d = static_cast<unsigned char*>(c[i].dst);
    const auto* s = static_cast<const unsigned char*>(c[i].src);
    for (int b = 0; b < c[i].bytes; ++b) d[b] = b < c[i].src_bytes ? s[b] : 0;  // zero fill past src-size
  }
}
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the rows of 8x8 tile i;
// register i of lane l gets tile i's row l / 4, columns 2 (l % 4) and + 1 (transposed: rows
// 2 (l % 4) and + 1 of column l / 4).
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t address, bool trans,
                        const char* site) {
  const void* mine = shared_pointer(address);
  const void* rows[32];
  warp_allgather(&mine, rows, sizeof mine, site);
  const int lane = lane_id();
  uint32_t* r[4] = {&r0, &r1, &r2, &r3};
  for (int i = 0; i < 4; ++i) {
    const auto row = [&](int j) { return static_cast<const uint16_t*>(rows[8 * i + j]); };
    const uint16_t lo = trans ? row(2 * (lane % 4))[lane / 4] : row(lane / 4)[2 * (lane % 4)];
    const uint16_t hi = trans ? row(2 * (lane % 4) + 1)[lane / 4] : row(lane / 4)[2 * (lane % 4) + 1];
    *r[i] = uint32_t(lo) | uint32_t(hi) << 16;
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 of the warp: the PTX fragment
// layout (groupID = lane / 4, threadID_in_group = lane % 4).
struct F16Tag {};
struct Bf16Tag {};
template <class Tag>
void mma_m16n8k16(float& c0, float& c1, float& c2, float& c3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                  uint32_t b0, uint32_t b1);
[[noreturn]] void unsupported_asm(const char* text);

}  // namespace emu

// The running thread's built-in variables; the scheduler sets them before it resumes a thread.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define EMU_WHERE (__FILE__ ":" EMU_STR(__LINE__))

#define __syncthreads() ::emu::sync_block(EMU_WHERE)
#define __syncwarp(...) ::emu::sync_warp(EMU_WHERE, ##__VA_ARGS__)
#define __trap() ::emu::fault("__trap()")

namespace emu {
template <class T>
inline T shfl(const char* site, unsigned mask, T v, int src, int width = 32) {
  if (width != 32) fault("__shfl_sync / __shfl_xor_sync: only width 32 is emulated");
  T r;
  warp_exchange(&v, &r, sizeof(T), src & 31, mask, site);
  return r;
}
template <class T>
inline T shfl_xor(const char* site, unsigned mask, T v, int lane_mask, int width = 32) {
  return shfl(site, mask, v, lane_id() ^ lane_mask, width);
}
}  // namespace emu
#define __shfl_xor_sync(...) ::emu::shfl_xor(EMU_WHERE, __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl(EMU_WHERE, __VA_ARGS__)

// CUDA's min / max overloads of device code, for any two arithmetic types.
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int x) { return ::emu::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return ::emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return ::emu::bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return ::emu::bit_cast<int>(x); }
inline double __longlong_as_double(long long x) { return ::emu::bit_cast<double>(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::emu::shared_address(p); }

// Atomics as compare-and-swap loops of the compiler's __atomic builtins (atomic for the sanitizers).
inline float atomicAdd(float* p, float v) {
  auto* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(u, &old, ::emu::bit_cast<uint32_t>(::emu::bit_cast<float>(old) + v), false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return ::emu::bit_cast<float>(old);
}
inline float2 atomicAdd(float2* p, float2 v) {  // sm_90: elementwise, each element atomic
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) ::emu::fault("atomicAdd(float2*): address not 8-byte aligned");
  return {atomicAdd(&p->x, v.x), atomicAdd(&p->y, v.y)};
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
