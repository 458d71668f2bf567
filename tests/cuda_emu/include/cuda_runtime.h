// Stand-in for the CUDA runtime API, as far as our launchers use it, over the CPU emulation of
// emu_device.h. The device is an sm_90 with EMU_SMS streaming multiprocessors (default 4, so that
// grid-stride and tile loops take several turns on small test shapes).
#pragma once

#include "emu_device.h"

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0, constSizeBytes = 0, localSizeBytes = 0;
  int maxThreadsPerBlock = 1024, numRegs = 32, ptxVersion = 90, binaryVersion = 90, cacheModeCA = 0,
      maxDynamicSharedSizeBytes = 48 * 1024;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned int x, y, z;
  } clusterDim;
  char pad[64];
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

namespace emu {
int sms();
int func_attributes(const void* kernel, cudaFuncAttributes* attr);
int func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
int max_active_clusters(const void* kernel, const cudaLaunchConfig_t* cfg, int* n);
int take_last_error();
int peek_last_error();
unsigned cluster_of(const cudaLaunchConfig_t* cfg, int* err);
}  // namespace emu

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = ::emu::sms(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return ::emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}
template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T kernel) {
  return ::emu::func_attributes(reinterpret_cast<const void*>(kernel), attr);
}
template <class T>
cudaError_t cudaFuncSetAttribute(T kernel, cudaFuncAttribute a, int value) {
  return ::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), a, value);
}
template <class T>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, T kernel, const cudaLaunchConfig_t* cfg) {
  return ::emu::max_active_clusters(reinterpret_cast<const void*>(kernel), cfg, n);
}
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args&&... args) {
  int err = 0;
  const unsigned cluster = ::emu::cluster_of(cfg, &err);
  if (err == 0)
    err = ::emu::launch(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster,
                        std::forward<Args>(args)...);
  return err;
}
