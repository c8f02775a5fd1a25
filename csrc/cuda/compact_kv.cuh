// KV compaction (cspkv.reference.compact_kv): an exact gather of the kept rows
// keys[b, h, keep_idx[b, h, k], :] into a contiguous [B, Hkv, K, D] output.
//
// A copy needs no dtype: rows are moved as VecT words (uint4 = 16 bytes when
// the binding found every source row of keys and values 16-byte aligned,
// else 8, 4 or 2 bytes, down to one element; a strided last dim moves one
// element at a time with s_v = its stride). One launch moves both tensors:
// grid (B * Hkv, row chunks, 2), blockIdx.z = 0 keys, 1 values; block (TX, TY):
// TX threads walk the words of a row, TY rows at a time, each thread
// kRowsPerThread rows (loads first, then stores). No integer division per word.
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
constexpr int kRowsPerThread = 4;
constexpr int kErrorRange = 1;
constexpr int kErrorOrder = 2;

}  // namespace compact

// One of the two tensors a launch compacts, in VecT words.
template <typename VecT>
struct CompactRows {
  const VecT* src;                     // [B, Hkv, L, nvec] at the strides below
  int64_t s_b, s_h, s_l, s_v;          // source strides in words (s_v: between the words of a row)
  VecT* dst;                           // [B, Hkv, K, nvec] contiguous
  int nvec;                            // words per row
};

template <typename VecT>
__global__ void __launch_bounds__(compact::kThreads)
    compact_rows_kernel(CompactRows<VecT> keys, CompactRows<VecT> values,
                        const int64_t* __restrict__ keep_idx,  // [B, Hkv, K] contiguous
                        int Hkv, int64_t L, int64_t K,
                        int* __restrict__ error_flag)          // [1], bits compact::kError*, or nullptr
{
  using compact::kRowsPerThread;
  const CompactRows<VecT> rows = blockIdx.z == 0 ? keys : values;
  const int bh = blockIdx.x;
  const int b = bh / Hkv, h = bh % Hkv;
  const int64_t* idx_row = keep_idx + static_cast<int64_t>(bh) * K;
  const VecT* __restrict__ src_bh = rows.src + b * rows.s_b + h * rows.s_h;
  VecT* __restrict__ dst_bh = rows.dst + static_cast<int64_t>(bh) * K * rows.nvec;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y * kRowsPerThread;
  // A thread moves kRowsPerThread rows blockDim.y apart, all loads before the
  // stores, so that many reads are in flight per thread.
  for (int64_t k0 = static_cast<int64_t>(blockIdx.y) * blockDim.y * kRowsPerThread + threadIdx.y; k0 < K; k0 += step) {
    const VecT* in[kRowsPerThread];  // nullptr: a row past K, or a bad index (zero-filled)
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.y;
      in[u] = nullptr;
      if (k >= K) continue;
      const int64_t idx = idx_row[k];
      const bool in_range = idx >= 0 && idx < L;
      const bool ascending = k == 0 || idx > idx_row[k - 1];
      if (in_range && ascending) {
        in[u] = src_bh + idx * rows.s_l;
      } else if (threadIdx.x == 0 && blockIdx.z == 0 && error_flag != nullptr) {
        // Keys and values see the same index: the keys' blocks report it.
        atomicOr(error_flag, (in_range ? 0 : compact::kErrorRange) | (ascending ? 0 : compact::kErrorOrder));
      }
    }
    for (int v = threadIdx.x; v < rows.nvec; v += blockDim.x) {
      VecT word[kRowsPerThread];
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) word[u] = in[u] != nullptr ? in[u][v * rows.s_v] : VecT{};
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.y;
        if (k < K) dst_bh[k * rows.nvec + v] = word[u];
      }
    }
  }
}

}  // namespace cuda
}  // namespace cspkv
