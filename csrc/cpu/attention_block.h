// The CPU attention kernels' inner steps (nsoftmax_attention.cpp, packed_attention.cpp): a
// block of keys folded into the online softmax of a tile of query rows, and a row's output.
// attend_block is defined once (attention_block.cpp, per-CPU clones behind one ifunc); the
// small helpers have internal linkage, each kernel file its own copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/common.h"

namespace cspkv::cpu {
namespace {

// Keys per block: the block's K and V rows stay in L1/L2 while every row of the
// tile uses them.
constexpr int64_t kBlockKeys = 64;
// Query rows per tile (decode has G of them, prefill chunks G * Q).
constexpr int64_t kTileRows = 64;

// One thread's scratch for attend_block over tiles of up to `tile_rows` query rows: the tile's
// queries in float32, each row's key limit and its end within the block, the block's logits
// and seen-key list, and (for a half/bf16 cache) the block's K and V converted to float32.
struct BlockScratch {
  std::vector<float> q_tile;
  std::vector<int64_t> limits, ends;
  std::vector<float> s;
  std::vector<int32_t> seen;
  std::vector<float> k_block, v_block;

  BlockScratch(int64_t tile_rows, int64_t D, int64_t Dv, bool float_cache)
      : q_tile(tile_rows * D), limits(tile_rows), ends(tile_rows), s(kBlockKeys), seen(kBlockKeys),
        k_block(float_cache ? 0 : kBlockKeys * D), v_block(float_cache ? 0 : kBlockKeys * Dv) {}
};

// Converts `rows` rows of half/bf16 K or V into a float32 block.
template <typename scalar_t>
CSPKV_CPU_CLONES void rows_to_float(const scalar_t* src,  // [rows, ld]
                                    int64_t ld, int64_t rows, int64_t cols,
                                    float* dst) {         // [rows, cols]
  for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < cols; ++d) dst[j * cols + d] = static_cast<float>(src[j * ld + d]);
  }
}

}  // namespace

// Folds one block of keys into the online softmax state of `rows` query rows.
// Keys a row may not see are never read from V, so dead slots holding garbage
// (even NaN) cannot leak into the output. The first row processed prefetches
// the next block's keys and values (`next_k`, `next_v`) four at a time.
void attend_block(const float* q,         // [rows, D]
                  const int64_t* ends,    // [rows] row r sees block keys j < ends[r]
                  int64_t rows,
                  const float* k,         // [keys, ldk]
                  int64_t ldk,
                  const float* v,         // [keys, ldv]
                  int64_t ldv,
                  const bool* valid,      // [keys], or nullptr: all valid
                  int64_t D, int64_t Dv, float scale,
                  float* s,               // [kBlockKeys] scratch
                  int32_t* seen,          // [kBlockKeys] scratch
                  float* m,               // [rows] running max
                  float* l,               // [rows] running sum of exp(s - m)
                  float* acc,             // [rows, Dv] running sum of exp(s - m) v
                  const cpu::RowPrefetch& next_k, const cpu::RowPrefetch& next_v);

namespace {

// out = acc * exp(m - lse_n): the row's n-softmax average of V; zeros when
// the row saw no key.
template <typename scalar_t>
void write_row(float m, float l, const float* acc,  // [Dv]
               int64_t Dv, double n,
               scalar_t* out) {                     // [Dv]
  const float factor = m == kNegInf ? 0.0f : cpu::nsoftmax_factor(m, l, n);
  for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(acc[d] * factor);
}

}  // namespace
}  // namespace cspkv::cpu
