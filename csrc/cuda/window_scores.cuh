// Fused modality-masked window scores (cspkv.reference.window_scores) without
// a W x L probability matrix in memory, on CUDA cores: for float32, for rows
// that are not 16-byte aligned and for GPUs before sm_80 (half and bfloat16
// inputs otherwise run window_scores_mma.cuh, same passes on tensor cores).
// Two passes over the logits of the G * W query rows of each (b, hkv) against
// its L keys:
//
//   1. window_row_stats_kernel: per query row and key split, softmax
//      statistics (max, sum of exp) of the allowed logits; grid
//      (row tiles, key splits, B * Hkv). window_row_lse_kernel merges the
//      splits into the log n-softmax denominator of each row.
//   2. window_scores_kernel: one block per (key tile, b, hkv) recomputes the
//      logits of every query row against its keys, turns them into
//      probabilities with the stored denominators and sums them per key into
//      self / cross. Each block owns a disjoint slice of the outputs: no atomics.
//
// Both passes compute logits with tile_dots on the same shared-memory layout,
// so pass 2 sees exactly the logits pass 1 normalised.
//
// Tile shape (256 threads): a key tile of 64 keys, one per thread of a row
// group; 4 row groups x 8 rows per thread = 32 query rows per tile. Shared
// memory: the query tile (32 x padded_d floats) and the key tile
// (64 x (padded_d + 1) floats): 48.3 KiB for D = 128, 96.3 KiB for D = 256.
#pragma once

#include "common.cuh"

namespace cspkv {
namespace cuda {
namespace window {

constexpr int kThreads = 256;
constexpr int kTileKeys = 64;
constexpr int kRowGroups = kThreads / kTileKeys;
constexpr int kRowsPerThread = 8;
constexpr int kTileRows = kRowGroups * kRowsPerThread;
constexpr int kWarpsPerRowGroup = kTileKeys / kWarp;
// Key splits of pass 1 are bounded so that the statistics buffer stays small.
constexpr int kMaxSplits = 1024;

inline size_t shared_memory_bytes(int padded_d) {
  return sizeof(float) * (static_cast<size_t>(kTileRows) * padded_d + static_cast<size_t>(kTileKeys) * (padded_d + 1));
}

}  // namespace window

template <typename scalar_t>
struct WindowScoresParams {
  const scalar_t* q_win;  // [B, H, W, D], last dim contiguous
  const scalar_t* keys;   // [B, Hkv, L, D], last dim contiguous
  const int32_t* q_mod;   // [B, W] contiguous, -1 = padding
  const int32_t* k_mod;   // [B, L] contiguous, -1 = padding
  int64_t q_stride_b, q_stride_h, q_stride_w;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int Hkv, G, W, L, D, padded_d;
  FastDivmod w_divmod;  // by W: window row r is (g, w) = (r / W, r % W)
  bool q_vec16, k_vec16;  // rows may be read with 16-byte loads (see load_rows_to_shared)
  float scale;
};

// Query row r < G * W of KV head hkv is head hkv * G + r / W, window position
// r % W (rows are g-major, matching the reference's reshape(B, Hkv, G, W, D)).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* window_query_row(const WindowScoresParams<scalar_t>& p, int b, int hkv,
                                                            int r) {
  const int g = p.w_divmod.div(r);
  const int h = hkv * p.G + g;
  return p.q_win + b * p.q_stride_b + h * p.q_stride_h + (r - g * p.W) * p.q_stride_w;
}

// Window index w of query row r (r = g * W + w) of batch row b, or -1 when r
// is past the G * W rows or its query is padding: such a row scores nothing.
template <typename scalar_t>
__device__ __forceinline__ int scoring_window_index(const WindowScoresParams<scalar_t>& p, int b, int r) {
  if (r >= p.G * p.W) return -1;
  const int w = p.w_divmod.mod(r);
  return p.q_mod[static_cast<int64_t>(b) * p.W + w] < 0 ? -1 : w;
}

// End of the keys pass 1 visits for rows [r0, r_end) in the split starting at
// j_begin: keys past the last position of those rows are never allowed.
template <typename scalar_t>
__device__ __forceinline__ int split_key_end(const WindowScoresParams<scalar_t>& p, int r0, int r_end, int j_begin,
                                             int keys_per_split) {
  const int last_position = p.L - p.W + max_inner_index(r0, r_end, p.w_divmod);  // window row w sits at L - W + w
  return min_of(min_of(j_begin + keys_per_split, p.L), last_position + 1);
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* window_key_row(const WindowScoresParams<scalar_t>& p, int b, int hkv, int j) {
  return p.keys + b * p.k_stride_b + hkv * p.k_stride_h + j * p.k_stride_l;
}

template <typename scalar_t>
__device__ __forceinline__ void load_window_query_tile(const WindowScoresParams<scalar_t>& p, float* q_s, int b,
                                                       int hkv, int r0) {
  const int rows = p.G * p.W;
  load_rows_to_shared<window::kThreads, scalar_t>(
      q_s, p.padded_d, window::kTileRows, p.D, p.padded_d, p.q_vec16,
      [&](int i) -> const scalar_t* { return r0 + i < rows ? window_query_row(p, b, hkv, r0 + i) : nullptr; });
}

// Keys [j0, j0 + kTileKeys) of (b, hkv); keys at or past j_end are zero rows.
template <typename scalar_t>
__device__ __forceinline__ void load_window_key_tile(const WindowScoresParams<scalar_t>& p, float* k_s, int b, int hkv,
                                                     int j0, int j_end) {
  load_rows_to_shared<window::kThreads, scalar_t>(
      k_s, p.padded_d + 1, window::kTileKeys, p.D, p.padded_d, p.k_vec16,
      [&](int i) -> const scalar_t* { return j0 + i < j_end ? window_key_row(p, b, hkv, j0 + i) : nullptr; });
}

// Pass 1: softmax statistics of each query row over one split of the keys.
// grid (ceil(G*W / kTileRows), nsplit, B * Hkv), block kThreads.
// Each thread keeps running (max, sum) for its 8 rows over the keys it owns
// (one key slot of every tile), then the 64 key slots of a row are merged.
template <typename scalar_t>
__global__ void __launch_bounds__(window::kThreads)
    window_row_stats_kernel(const WindowScoresParams<scalar_t> p,
                            int keys_per_split,              // multiple of kTileKeys
                            int nsplit,
                            float2* __restrict__ row_stats)  // [B * Hkv, G * W, nsplit] (max, sum exp(s - max))
{
  using namespace window;
  extern __shared__ __align__(16) unsigned char window_smem[];
  float* q_s = reinterpret_cast<float*>(window_smem);  // [kTileRows, padded_d]
  float* k_s = q_s + kTileRows * p.padded_d;           // [kTileKeys, padded_d + 1]
  __shared__ int row_w[kTileRows];                     // window index of the row; -1: the row scores nothing
  __shared__ int key_mod[kTileKeys];                   // -1 also for keys outside this split
  __shared__ float2 warp_stats[kTileRows][kWarpsPerRowGroup];

  const int tid = threadIdx.x;
  const int rows = p.G * p.W;
  const int r0 = blockIdx.x * kTileRows;
  const int r_end = min_of(r0 + kTileRows, rows);
  const int split = blockIdx.y;
  const int bh = blockIdx.z;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;

  if (tid < kTileRows) row_w[tid] = scoring_window_index(p, b, r0 + tid);
  load_window_query_tile(p, q_s, b, hkv, r0);

  const int key = tid % kTileKeys, group = tid / kTileKeys;
  const int first_row = group * kRowsPerThread;
  const int offset = p.L - p.W;  // window row w sits at position offset + w
  const int j_begin = split * keys_per_split;
  const int j_end = split_key_end(p, r0, r_end, j_begin, keys_per_split);

  float m[kRowsPerThread], l[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  for (int j0 = j_begin; j0 < j_end; j0 += kTileKeys) {
    __syncthreads();  // the previous key tile is no longer read
    load_window_key_tile(p, k_s, b, hkv, j0, j_end);
    if (tid < kTileKeys) {
      const int j = j0 + tid;
      key_mod[tid] = j < j_end ? p.k_mod[static_cast<int64_t>(b) * p.L + j] : -1;
    }
    __syncthreads();  // key tile, and on the first iteration the query tile and row_w, are ready
    float dot[kRowsPerThread];
    tile_dots<kRowsPerThread>(q_s, k_s, p.padded_d, first_row, key, dot);
    const int j = j0 + key;
    const bool key_scores = key_mod[key] >= 0;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int w = row_w[first_row + i];
      if (key_scores && w >= 0 && j <= offset + w) {
        const float s = dot[i] * p.scale;
        if (s > m[i]) {
          l[i] = l[i] * expf(m[i] - s) + 1.f;  // m = -inf on the first key: 0 * 0 + 1
          m[i] = s;
        } else {
          l[i] += expf(s - m[i]);
        }
      }
    }
  }

  // Merge the 64 key slots of each row: across the lanes of each warp, then
  // across the kWarpsPerRowGroup warps of the row group. Every lane runs the
  // shuffles (no divergence around them).
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    float mi = m[i], li = l[i];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const float mo = __shfl_xor_sync(kFullMask, mi, off);
      const float lo = __shfl_xor_sync(kFullMask, li, off);
      merge_softmax_stats(mi, li, mo, lo);
    }
    if (tid % kWarp == 0) warp_stats[first_row + i][key / kWarp] = make_float2(mi, li);
  }
  __syncthreads();
  if (tid < kTileRows && r0 + tid < rows) {
    float mi = -INFINITY, li = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarpsPerRowGroup; ++wi) merge_softmax_stats(mi, li, warp_stats[tid][wi].x, warp_stats[tid][wi].y);
    row_stats[(static_cast<int64_t>(bh) * rows + r0 + tid) * nsplit + split] = make_float2(mi, li);
  }
}

// Pass 1b: merges the key splits of each row into its log n-softmax
// denominator; -inf for a row without allowed keys when n = 0 (pass 2 never
// reads it: such a row has no allowed pair). One thread per row.
__global__ void __launch_bounds__(256)
    window_row_lse_kernel(const float2* __restrict__ row_stats,  // [rows, nsplit]
                          int64_t rows,                          // B * Hkv * G * W
                          int nsplit, bool use_n, float log_n,
                          float* __restrict__ log_denominator)   // [rows]
{
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  float m = -INFINITY, l = 0.f;
  for (int i = 0; i < nsplit; ++i) {
    const float2 s = row_stats[row * nsplit + i];
    merge_softmax_stats(m, l, s.x, s.y);
  }
  float result;
  if (m == -INFINITY) {
    result = use_n ? log_n : -INFINITY;  // logaddexp(-inf, log n) = log n
  } else {
    result = nsoftmax_log_denominator(m, l, use_n, log_n);
  }
  log_denominator[row] = result;
}

// Pass 2: per key, the summed n-softmax probability from same-modality
// (self) and other-modality (cross) window rows of all G heads of the group.
// grid (ceil(L / kTileKeys), B * Hkv), block kThreads. A thread accumulates
// its key over its 8 rows of every row tile; the 4 row groups are summed at
// the end.
template <typename scalar_t>
__global__ void __launch_bounds__(window::kThreads)
    window_scores_kernel(const WindowScoresParams<scalar_t> p,
                         const float* __restrict__ log_denominator,  // [B * Hkv, G * W] from pass 1b
                         float* __restrict__ self_scores,            // [B, Hkv, L]
                         float* __restrict__ cross_scores)           // [B, Hkv, L]
{
  using namespace window;
  extern __shared__ __align__(16) unsigned char window_smem[];
  float* q_s = reinterpret_cast<float*>(window_smem);  // [kTileRows, padded_d]
  float* k_s = q_s + kTileRows * p.padded_d;           // [kTileKeys, padded_d + 1]
  __shared__ int row_w[kTileRows];                     // -1: the row scores nothing
  __shared__ int row_mod[kTileRows];
  __shared__ float row_log_den[kTileRows];
  __shared__ int key_mod[kTileKeys];  // -1 also for keys past L
  __shared__ float2 group_sums[kRowGroups][kTileKeys];

  const int tid = threadIdx.x;
  const int rows = p.G * p.W;
  const int j0 = blockIdx.x * kTileKeys;
  const int bh = blockIdx.y;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int offset = p.L - p.W;

  load_window_key_tile(p, k_s, b, hkv, j0, p.L);
  if (tid < kTileKeys) {
    const int j = j0 + tid;
    key_mod[tid] = j < p.L ? p.k_mod[static_cast<int64_t>(b) * p.L + j] : -1;
  }

  const int key = tid % kTileKeys, group = tid / kTileKeys;
  const int first_row = group * kRowsPerThread;
  const int j = j0 + key;
  float self_sum = 0.f, cross_sum = 0.f;
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    // Rows that all sit before this key tile see none of its keys. The
    // condition depends on block-uniform values only, so skipping keeps every
    // thread on the same __syncthreads().
    if (offset + max_inner_index(r0, min_of(r0 + kTileRows, rows), p.w_divmod) < j0) continue;
    __syncthreads();  // the previous query tile and its row data are no longer read
    if (tid < kTileRows) {
      const int r = r0 + tid;
      const int w = scoring_window_index(p, b, r);
      row_w[tid] = w;
      row_mod[tid] = w < 0 ? -1 : p.q_mod[static_cast<int64_t>(b) * p.W + w];
      row_log_den[tid] = w < 0 ? 0.f : log_denominator[static_cast<int64_t>(bh) * rows + r];
    }
    load_window_query_tile(p, q_s, b, hkv, r0);
    __syncthreads();  // query tile ready (and, on the first tile, the key tile)
    float dot[kRowsPerThread];
    tile_dots<kRowsPerThread>(q_s, k_s, p.padded_d, first_row, key, dot);
    const int kmod = key_mod[key];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = first_row + i;
      const int w = row_w[row];
      if (kmod >= 0 && w >= 0 && j <= offset + w) {
        const float prob = expf(dot[i] * p.scale - row_log_den[row]);
        if (row_mod[row] == kmod) {
          self_sum += prob;
        } else {
          cross_sum += prob;
        }
      }
    }
  }
  group_sums[group][key] = make_float2(self_sum, cross_sum);
  __syncthreads();
  if (tid < kTileKeys && j0 + tid < p.L) {
    float2 total = group_sums[0][tid];
#pragma unroll
    for (int g = 1; g < kRowGroups; ++g) {
      total.x += group_sums[g][tid].x;
      total.y += group_sums[g][tid].y;
    }
    const int64_t out = static_cast<int64_t>(bh) * p.L + j0 + tid;
    self_scores[out] = total.x;
    cross_scores[out] = total.y;
  }
}

}  // namespace cuda
}  // namespace cspkv
