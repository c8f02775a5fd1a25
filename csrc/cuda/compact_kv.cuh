// KV compaction (cspkv.reference.compact_kv): an exact gather of the kept rows
// keys[b, h, keep_idx[b, h, k], :] into a contiguous [B, Hkv, K, D] output.
//
// A copy needs no dtype: rows are moved as VecT words (uint4 = 16 bytes when
// the binding found every source row 16-byte aligned, else 8, 4 or 2 bytes,
// down to one element; a strided last dim moves one element at a time with
// s_v = its stride). Block (TX, TY): TX threads walk the words of a row, TY
// rows per block; grid (B * Hkv, row chunks). No integer division per word.
//
// keep_idx is validated as it is used: an index outside [0, L) or not above
// its predecessor has its row written as zeros instead of read, and sets a
// bit in *error_flag (1: range, 2: order) unless error_flag is null. The
// binding raises after the launch.
#pragma once

#include "common.cuh"

namespace cspkv {
namespace cuda {
namespace compact {

constexpr int kThreads = 256;
constexpr int kErrorRange = 1;
constexpr int kErrorOrder = 2;

}  // namespace compact

template <typename VecT>
__global__ void __launch_bounds__(compact::kThreads)
    compact_rows_kernel(const VecT* __restrict__ src,          // [B, Hkv, L, nvec] words, strides below
                        int64_t s_b, int64_t s_h, int64_t s_l, int64_t s_v,  // source strides in words
                        const int64_t* __restrict__ keep_idx,  // [B, Hkv, K] contiguous
                        VecT* __restrict__ dst,                // [B, Hkv, K, nvec] contiguous
                        int Hkv, int64_t L, int64_t K, int nvec,
                        int* __restrict__ error_flag)          // [1], bits compact::kError*, or nullptr
{
  const int bh = blockIdx.x;
  const int b = bh / Hkv, h = bh % Hkv;
  const int64_t* idx_row = keep_idx + static_cast<int64_t>(bh) * K;
  const VecT* src_bh = src + b * s_b + h * s_h;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; k < K;
       k += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const int64_t idx = idx_row[k];
    const bool in_range = idx >= 0 && idx < L;
    const bool ascending = k == 0 || idx > idx_row[k - 1];
    VecT* out = dst + (static_cast<int64_t>(bh) * K + k) * nvec;
    if (in_range && ascending) {
      const VecT* in = src_bh + idx * s_l;
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) out[v] = in[v * s_v];
    } else {
      if (threadIdx.x == 0 && error_flag != nullptr) atomicOr(error_flag, (in_range ? 0 : compact::kErrorRange) | (ascending ? 0 : compact::kErrorOrder));
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) out[v] = VecT{};
    }
  }
}

}  // namespace cuda
}  // namespace cspkv
