// Every tuning decision of the bindings, as a pure function of sizes and
// flags: which kernel runs, how many blocks or parts the work is cut into, how
// much work a CPU task takes. No tensors, no CUDA runtime calls: a binding asks
// the device what it must (SM count, whether the tensor-core kernels can run)
// and passes the answers in, so each rule reads, and changes, apart from the
// launch code. Kernel geometry (tile sizes, threads per block) stays beside
// the kernels whose code depends on it and comes in as arguments too.
//
// One header for the CPU (.cpp) and CUDA (.cu) bindings alike, hence plain C++.
// Measurements behind a rule are in the result file its comment names.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>

namespace cspkv::heuristics {

// How a kernel that walks `length` keys in steps of `keys_per_step` cuts them
// into splits (a grid dimension) when `blocks` blocks exist without splitting.
struct KeySplits {
  int64_t count, keys_per_split;
};

// About `blocks_per_sm` blocks per SM, at most `max_splits`, whole steps per
// split, no empty split.
inline KeySplits split_keys(int64_t length, int64_t blocks, int64_t blocks_per_sm, int64_t sm_count,
                            int64_t keys_per_step, int64_t max_splits) {
  const int64_t steps = (length + keys_per_step - 1) / keys_per_step;
  int64_t n = (blocks_per_sm * sm_count + blocks - 1) / blocks;
  n = std::max<int64_t>(1, std::min<int64_t>(n, std::min<int64_t>(steps, max_splits)));
  const int64_t keys_per_split = (steps + n - 1) / n * keys_per_step;
  return {(length + keys_per_split - 1) / keys_per_split, keys_per_split};
}

// ---------------------------------------------------------------- window_scores, CUDA

// The tensor-core kernels whenever they can take the input (half / bfloat16
// rows that 16-byte loads may read) and this device's binary can run them
// (sm_80+); the CUDA-core kernels take everything else.
inline bool window_tensor_cores(bool half_precision, bool rows_16b_aligned, bool kernels_runnable) {
  return half_precision && rows_16b_aligned && kernels_runnable;
}

// Pass 1's key splits: (row tile, key split) blocks enough to fill the GPU
// about twice, so that short windows over long prompts still occupy every SM.
inline KeySplits window_stats_splits(int64_t L, int64_t row_tile_blocks, int64_t sm_count, int64_t tile_keys,
                                     int64_t max_splits) {
  return split_keys(L, row_tile_blocks, 2, sm_count, tile_keys, max_splits);
}

// Most 16-key MMA tiles per warp in pass 2 at a padded head dim: two only at
// 128, where one 256-thread block per SM holds their fragments and they can be
// faster; at 64 two took 0.98-1.22x the time of one, at 256 they do not fit
// the registers (gpu-check-h200.md).
constexpr int window_max_key_tiles(int padded_head_dim) {
  return padded_head_dim == 128 ? 2 : 1;
}

// Whether pass 2 (where two tiles fit) takes two key tiles per warp, one
// block of `two_tile_keys` keys per SM instead of two half as large: two were
// 3-9% faster with at least 4 streamed row tiles and a block for every SM; one
// took 0.81-1.05x the time of two otherwise (few rows to amortise the
// stationary tile, or too few blocks, e.g. Qwen2-VL's 4 KV heads at 4k keys)
// (gpu-check-h200.md).
inline bool window_two_key_tiles(int64_t rows, int64_t L, int64_t batch_heads, int64_t sm_count,
                                 int64_t streamed_rows, int64_t two_tile_keys) {
  if (rows < 4 * streamed_rows) return false;
  const int64_t blocks = (L + two_tile_keys - 1) / two_tile_keys * batch_heads;
  return blocks >= sm_count;
}

// ---------------------------------------------------------------- nsoftmax_attention, CUDA

// The decode kernel whenever one of its instances takes the input (half /
// bfloat16 rows that 16-byte loads may read, few enough query rows per KV head
// for its registers: decode::fits): with so few rows most of the tiled
// kernel's 16-row tiles would idle, the decode kernel streams K and V from
// memory into registers instead.
inline bool attention_decode(bool half_precision, bool rows_16b_aligned, bool decode_instance_fits) {
  return half_precision && rows_16b_aligned && decode_instance_fits;
}

// The decode kernel's key splits: about four blocks per SM, as its blocks are
// small and enough loads must be in flight to cover the memory latency.
inline KeySplits attention_decode_splits(int64_t Lc, int64_t batch_heads, int64_t sm_count, int64_t keys_per_step,
                                         int64_t max_splits) {
  return split_keys(Lc, batch_heads, 4, sm_count, keys_per_step, max_splits);
}

// The tiled kernel's key splits: about two blocks per SM (its blocks are
// large), splits of whole key tiles.
inline KeySplits attention_tiled_splits(int64_t Lc, int64_t row_tile_blocks, int64_t sm_count, int64_t tile_keys,
                                        int64_t max_splits) {
  return split_keys(Lc, row_tile_blocks, 2, sm_count, tile_keys, max_splits);
}

// ---------------------------------------------------------------- compact_kv and the store append, CUDA

// Threads along a row of `row_words` words: the power of two that covers
// them, at most a warp, so that a warp copies whole rows in coalesced sweeps
// and short rows leave the block's other threads to other rows.
inline int compact_row_threads(int64_t row_words) {
  int threads = 1;
  while (threads < row_words && threads < 32) threads *= 2;
  return threads;
}

// Blocks per tensor of the decode append: one per `threads` elements of the
// largest tensor, at most 1024; beyond that the grid-stride loop covers the
// rest rather than launching a grid that only adds block overhead.
inline int64_t append_blocks(int64_t elements, int64_t threads) {
  return std::min<int64_t>((elements + threads - 1) / threads, 1024);
}

// ---------------------------------------------------------------- CPU kernels

// How many parts to cut each of `items` equal work items into so that
// at::parallel_for's static split gives every thread the same work: items * parts
// a multiple of the thread count (B * Hkv alone is often 1-3 on 2-16 threads),
// with each part keeping at least `min_size` of the item's `size` units of work.
// With 4+ items per thread the imbalance is <= 25% and items stay whole.
inline int64_t parts_per_item(int64_t items, int64_t size, int64_t min_size, int64_t threads) {
  if (items % threads == 0 || items >= 4 * threads) return 1;
  const int64_t balanced = threads / std::gcd(items, threads);
  return std::clamp<int64_t>(size / std::max<int64_t>(min_size, 1), 1, balanced);
}

// Parts per KV head of CPU window_scores: fewer than 16 query rows per part
// would pack the head's keys for little work.
inline int64_t cpu_window_parts(int64_t heads, int64_t rows, int64_t threads) {
  return parts_per_item(heads, rows, 16, threads);
}

// Whether a part of CPU window_scores is one tile whose keys stream through
// one packed panel (read from memory once, prefetched): when its logits fit
// 2^18 floats (1 MiB). Larger parts pack their keys once and reuse them over
// L2-sized tiles instead.
inline bool cpu_window_streams_keys(int64_t part_rows, int64_t padded_keys) {
  return part_rows * padded_keys <= (int64_t{1} << 18);
}

// Query rows per tile of CPU window_scores when the keys are packed: about
// 2^16 logits (256 KiB) so the tile stays in L2 beside the packed keys, within
// [8, 64] rows so each packed key is reused enough, whole micro-kernel blocks.
inline int64_t cpu_window_tile_rows(int64_t L, int64_t row_block) {
  return std::clamp<int64_t>((int64_t{1} << 16) / L, 8, 64) / row_block * row_block;
}

// Parts of the cache per (KV head, row tile) of CPU nsoftmax_attention: a
// part shorter than 128 keys costs more to merge than it saves.
inline int64_t cpu_attention_parts(int64_t items, int64_t Lc, int64_t threads) {
  return parts_per_item(items, Lc, 128, threads);
}

// Rows per task of the CPU compact_kv gather: a task copies at least
// `grain_elements` (ATen's GRAIN_SIZE), so tasks are worth scheduling.
inline int64_t cpu_compact_rows_per_task(int64_t row_elements, int64_t grain_elements) {
  return std::max<int64_t>(1, grain_elements / row_elements);
}

// Rows per task of the CPU store append: about 64 KiB copied per task.
inline int64_t cpu_append_rows_per_task(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes));
}

}  // namespace cspkv::heuristics
