// The decode append's copies as plain data: "rows" of a rank-4 tensor
// [B, H, T, D] (keys, values, or the liveness [B, 1 or H, T] seen as D = 1)
// written into slots [n, n + T) of a store [B, H, capacity, D]. One
// descriptor per tensor lets the CPU loop and the CUDA kernel move keys,
// values and liveness in one call (one launch on a GPU) instead of three
// copy_ calls, each a TensorIterator set-up and a launch of its own: a decode
// step does this once per pruned layer, and its host time is what a GPU
// decode at large batch waits for.
#pragma once

#include <cstdint>

namespace cspkv {

struct StoreRows {
  char* dst;        // the store's slot 0 of row (0, 0)
  const char* src;  // the new rows' element (0, 0, 0, 0)
  int64_t dst_stride[3];  // b, h, slot (elements); the store's last dim is contiguous
  int64_t src_stride[4];  // b, h, t, d (elements); 0 broadcasts (a liveness of one head)
  int64_t B, H, T, D;
  int64_t element_size;  // bytes
};

}  // namespace cspkv
