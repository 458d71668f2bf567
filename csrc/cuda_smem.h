// Dynamic shared memory beyond the default limit, for every CUDA launcher (host code).
//
// Without cudaFuncAttributeMaxDynamicSharedMemorySize a kernel may take 48 KiB of shared memory
// in all: its static __shared__ arrays plus the dynamic bytes of the launch. A launch asking for
// more fails with "invalid argument". allow_dynamic_smem raises the kernel's limit when the
// static and dynamic bytes together pass 48 KiB.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>

namespace dalle_fast::cuda {

// Lets the next launch of `Kernel` on the current device take `bytes` of dynamic shared memory.
// Returns nullptr, or the CUDA error's message (more than the device allows per block). The
// attribute stays set, so each device pays the query once per larger request.
template <auto Kernel>
inline const char* allow_dynamic_smem(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<long long> allowed[kMaxDevices];  // bytes known to fit; zero-initialised
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && static_cast<long long>(bytes) <= allowed[dev].load(std::memory_order_relaxed)) return nullptr;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, Kernel);
  // A failed runtime call stays the thread's last error, which the next launch check (ours or
  // PyTorch's) would report against an innocent op: read it back, clearing it, before returning.
  if (err != cudaSuccess) return cudaGetErrorString((cudaGetLastError(), err));
  size_t fits = 48 * 1024 > attr.sharedSizeBytes ? 48 * 1024 - attr.sharedSizeBytes : 0;
  if (bytes > fits) {
    // Never below what another launch was allowed: it may be about to use it.
    const long long known = cached ? allowed[dev].load(std::memory_order_relaxed) : 0;
    const size_t limit = static_cast<long long>(bytes) > known ? bytes : static_cast<size_t>(known);
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit));
    if (err != cudaSuccess) return cudaGetErrorString((cudaGetLastError(), err));
    fits = limit;
  }
  if (cached) {
    long long known = allowed[dev].load(std::memory_order_relaxed);
    while (known < static_cast<long long>(fits) &&
           !allowed[dev].compare_exchange_weak(known, static_cast<long long>(fits), std::memory_order_relaxed)) {
    }
  }
  return nullptr;
}

}  // namespace dalle_fast::cuda
