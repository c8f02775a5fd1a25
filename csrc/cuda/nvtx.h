// NVTX ranges around each op's kernel launches, so Nsight Systems and Nsight
// Compute can select one op ("cspkv::window_scores", ...). Off unless the
// environment variable CSPKV_NVTX=1: it is read once and cached, so a disabled
// range costs one branch on a static bool. NVTX3 is header-only (it loads the
// profiler's injection library at run time only when a tool is attached).
#pragma once

#include <cstdlib>
#include <cstring>

#include <nvtx3/nvToolsExt.h>

namespace cspkv {
namespace cuda {

inline bool nvtx_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("CSPKV_NVTX");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return enabled;
}

// Scoped range: pushed in the constructor, popped in the destructor (also
// when a check throws between the two).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) : active_(nvtx_enabled()) {
    if (active_) nvtxRangePushA(name);
  }
  ~NvtxRange() {
    if (active_) nvtxRangePop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  bool active_;
};

}  // namespace cuda
}  // namespace cspkv
