#include "device_plan.h"

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include "../tile_plan.h"

namespace dalle_fast::cuda {

namespace {

// The device tensors behind one PlanView (they keep its memory alive).
struct Stored {
  std::vector<at::Tensor> tensors;
  PlanView view;
};

template <class Out, class In>
const Out* upload(std::vector<at::Tensor>& keep, const std::vector<In>& host, int device) {
  std::vector<Out> narrow(host.begin(), host.end());
  if (narrow.empty()) narrow.push_back(Out(0));  // a valid pointer even for an empty list
  const auto dtype = sizeof(Out) == 8 ? at::kLong : sizeof(Out) == 4 ? at::kInt : at::kByte;
  const auto cpu = at::from_blob(narrow.data(), {static_cast<int64_t>(narrow.size())}, at::TensorOptions().dtype(dtype));
  keep.push_back(cpu.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))));
  return static_cast<const Out*>(keep.back().data_ptr());
}

// The lists go up with their entries as physical positions (order[index[e]]): a kernel gathers
// a row with one dependent load instead of two.
PlanLists upload_lists(std::vector<at::Tensor>& keep, const TileLists& lists, const std::vector<int64_t>& order,
                       int device) {
  for (const auto v : {lists.start.back(), static_cast<int64_t>(lists.index.size())})
    TORCH_CHECK(v < (int64_t(1) << 31), "sparse_attention: the tile plan is too large for 32-bit indices");
  std::vector<int32_t> phys(lists.index.size());
  for (size_t e = 0; e < phys.size(); ++e) phys[e] = static_cast<int32_t>(order[lists.index[e]]);
  PlanLists out;
  out.start = upload<int32_t>(keep, lists.start, device);
  out.pos = upload<int32_t>(keep, phys, device);
  out.chunk_start = upload<int32_t>(keep, lists.chunk_start, device);
  out.words = upload<uint64_t>(keep, lists.words, device);
  out.full = upload<uint8_t>(keep, lists.full, device);
  return out;
}

}  // namespace

PlanView device_plan(const MaskSpec& mask, int64_t tile, int device) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int>;
  static std::mutex mutex;
  static std::map<Key, Stored> cache;
  const int64_t half = mask.kind == MaskKind::Conv ? mask.half : 0;
  const Key key{static_cast<int>(mask.kind), mask.text_len, mask.grid, half, tile, device};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second.view;
  TORCH_CHECK(mask.seq_len() < (int64_t(1) << 31), "sparse_attention: sequence too long for the CUDA tile plan");
  const auto plan = get_tile_plan(mask, tile);
  Stored stored;
  PlanView& view = stored.view;
  view.seq = static_cast<int32_t>(plan->seq);
  view.tile = static_cast<int32_t>(plan->tile);
  view.tiles = static_cast<int32_t>(plan->num_tiles());
  view.order = upload<int32_t>(stored.tensors, plan->order, device);
  view.keys = upload_lists(stored.tensors, plan->keys, plan->order, device);
  view.queries = upload_lists(stored.tensors, plan->queries, plan->order, device);
  // Never evicted (a model uses a handful of masks): kernels already queued may read any view.
  return cache.emplace(key, std::move(stored)).first->second.view;
}

}  // namespace dalle_fast::cuda
