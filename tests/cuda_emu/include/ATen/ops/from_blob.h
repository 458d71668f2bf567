// Stand-in for the corner of ATen that csrc/attention/cuda/device_plan.cpp uses to upload a tile
// plan: from_blob(...).to(cuda device) is a host copy here (the emulated device's memory is the
// host's), kept alive by the Tensor.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

namespace c10 {
using DeviceIndex = int8_t;
}

namespace at {

enum ScalarType { kByte, kInt, kLong };
enum DeviceType { kCPU, kCUDA };

struct Device {
  Device(DeviceType, c10::DeviceIndex) {}
};

struct TensorOptions {
  ScalarType type = kByte;
  TensorOptions dtype(ScalarType t) const {
    TensorOptions o;
    o.type = t;
    return o;
  }
};

inline size_t element_size(ScalarType t) { return t == kLong ? 8 : t == kInt ? 4 : 1; }

struct Tensor {
  std::shared_ptr<std::vector<unsigned char>> bytes;
  const void* blob = nullptr;  // from_blob: the caller's memory
  size_t size = 0;
  Tensor to(Device) const {
    Tensor copy;
    const void* src = blob != nullptr ? blob : bytes->data();
    copy.bytes = std::make_shared<std::vector<unsigned char>>(size);
    std::memcpy(copy.bytes->data(), src, size);
    copy.size = size;
    return copy;
  }
  void* data_ptr() const { return bytes->data(); }
};

inline Tensor from_blob(void* data, std::initializer_list<int64_t> sizes, TensorOptions options) {
  Tensor t;
  t.blob = data;
  t.size = element_size(options.type);
  for (int64_t s : sizes) t.size *= size_t(s);
  return t;
}

}  // namespace at
