// Stand-in for cooperative_groups.h: the thread-block cluster of the emulated launch.
#pragma once

#include "emu_device.h"

namespace cooperative_groups {

struct cluster_group {
  unsigned int block_rank() const { return ::emu::cluster_rank(); }
  unsigned int num_blocks() const { return ::emu::cluster_blocks(); }
  // translate.py writes x.sync() as x.sync_at("file:line").
  void sync_at(const char* site) const { ::emu::sync_cluster(site); }
  void sync() const { ::emu::sync_cluster("cluster.sync"); }
  template <class T>
  T* map_shared_rank(T* p, unsigned int rank) const {
    return static_cast<T*>(::emu::map_shared(p, rank, sizeof(T)));
  }
};
inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
