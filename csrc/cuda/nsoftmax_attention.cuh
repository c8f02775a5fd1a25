// n-softmax attention over a (pruned) cache (cspkv.reference.nsoftmax_attention),
// flash-decoding style, GQA without repeating K/V.
//
// attention_split_kernel: one block per (row tile, key split, b * Hkv). A row
// tile is up to 16 of the G * Q query rows of one KV head (r = g * Q + i), so
// each K/V row is read once per tile, i.e. once per group in decode. Per key
// tile of 32 keys (K and V staged in shared memory as float):
//   logits   thread (key = tid % 32, row group = warp) computes 2 rows x 1 key;
//   softmax  warp w updates the running (max, sum) of rows 2w, 2w + 1, one key
//            per lane, and rewrites the logits as probabilities;
//   P . V    16 threads per row, each owning the head-dim columns
//            lane, lane + 16, ... of the row's float32 accumulator.
// With one split the block writes the normalised output itself; otherwise it
// writes (max, sum) and the unnormalised accumulator per split, and
// attention_combine_kernel merges the splits of each row.
//
// Shared memory: query tile 16 x padded_d, key tile 32 x (padded_d + 1),
// value tile 32 x Dv, probabilities 16 x 33 floats: 42.2 KiB for D = Dv = 128,
// 82.2 KiB for D = Dv = 256.
#pragma once

#include "common.cuh"

namespace cspkv {
namespace cuda {
namespace attention {

constexpr int kThreads = 256;
constexpr int kTileKeys = 32;  // one key per lane
constexpr int kRowGroups = kThreads / kTileKeys;  // = warps
constexpr int kRowsPerThread = 2;
constexpr int kTileRows = kRowGroups * kRowsPerThread;
constexpr int kLanesPerRow = kThreads / kTileRows;  // P . V threads per query row
constexpr int kProbStride = kTileKeys + 1;         // odd: rows of p_s fall in different banks
constexpr int kMaxSplits = 256;
constexpr int kCombineThreads = 128;

static_assert(kRowGroups == kThreads / kWarp, "the logits row group of a thread is its warp");
static_assert(kTileRows == kRowsPerThread * (kThreads / kWarp), "softmax: each warp owns kRowsPerThread rows");

inline size_t shared_memory_bytes(int padded_d, int dv) {
  return sizeof(float) * (static_cast<size_t>(kTileRows) * padded_d + static_cast<size_t>(kTileKeys) * (padded_d + 1) +
                          static_cast<size_t>(kTileKeys) * dv + static_cast<size_t>(kTileRows) * kProbStride);
}

}  // namespace attention

template <typename scalar_t>
struct AttentionParams {
  const scalar_t* q;       // [B, H, Q, D], last dim contiguous
  const scalar_t* keys;    // [B, Hkv, Lc, D], last dim contiguous
  const scalar_t* values;  // [B, Hkv, Lc, Dv], last dim contiguous
  const bool* kv_valid;    // [B, Lc] or [B, Hkv, Lc] (any strides), or null: every slot valid
  int64_t q_stride_b, q_stride_h, q_stride_q;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t valid_stride_b, valid_stride_h, valid_stride_l;  // valid_stride_h = 0 for [B, Lc]
  int Hkv, G, Q, Lc, D, Dv, padded_d;
  bool q_vec16, k_vec16, v_vec16;  // rows may be read with 16-byte loads
  float scale;
  bool use_n;   // n > 0
  float log_n;  // log(n) when use_n
};

// Weight that turns a row's unnormalised accumulator sum_j exp(s_j - m) v_j
// into its output sum_j exp(s_j - log_den) v_j; 0 for a row without allowed
// keys (m = -inf), whose output is zeros.
__device__ __forceinline__ float output_weight(float m, float log_den) {
  return m == -INFINITY ? 0.f : expf(m - log_den);
}

// grid (ceil(G*Q / kTileRows), nsplit, B * Hkv), block kThreads.
// Output row of query row r of (b, hkv): (b * Hkv + hkv) * G * Q + r, which is
// the [B, H, Q, Dv] row of head hkv * G + r / Q, query r % Q.
template <typename scalar_t, int kDvChunks>
__global__ void __launch_bounds__(attention::kThreads)
    attention_split_kernel(const AttentionParams<scalar_t> p,
                           int keys_per_split,                // multiple of kTileKeys
                           int nsplit,
                           float2* __restrict__ part_stats,  // [B * Hkv * G * Q, nsplit] (max, sum); unused if nsplit == 1
                           float* __restrict__ part_acc,     // [B * Hkv * G * Q, nsplit, Dv]; unused if nsplit == 1
                           scalar_t* __restrict__ out)       // [B, H, Q, Dv]; written only if nsplit == 1
{
  using namespace attention;
  extern __shared__ __align__(16) unsigned char attention_smem[];
  float* q_s = reinterpret_cast<float*>(attention_smem);  // [kTileRows, padded_d]
  float* k_s = q_s + kTileRows * p.padded_d;              // [kTileKeys, padded_d + 1]
  float* v_s = k_s + kTileKeys * (p.padded_d + 1);        // [kTileKeys, Dv]
  float* p_s = v_s + kTileKeys * p.Dv;                    // [kTileRows, kProbStride]: logits, then probabilities
  __shared__ int row_last[kTileRows];  // last cache slot the row may see; -1 for rows past G * Q
  __shared__ float row_max[kTileRows], row_sum[kTileRows], row_rescale[kTileRows];
  __shared__ bool key_ok[kTileKeys];  // in this split and valid

  const int tid = threadIdx.x;
  const int rows = p.G * p.Q;
  const int r0 = blockIdx.x * kTileRows;
  const int r_end = min_of(r0 + kTileRows, rows);
  const int split = blockIdx.y;
  const int bh = blockIdx.z;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int offset = p.Lc - p.Q;  // query i sits at cache slot offset + i

  if (tid < kTileRows) {
    const int r = r0 + tid;
    row_last[tid] = r < rows ? offset + r % p.Q : -1;
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.f;
  }
  load_rows_to_shared<kThreads, scalar_t>(q_s, p.padded_d, kTileRows, p.D, p.padded_d, p.q_vec16,
                                          [&](int i) -> const scalar_t* {
                                            const int r = r0 + i;
                                            if (r >= rows) return nullptr;
                                            const int h = hkv * p.G + r / p.Q;
                                            return p.q + b * p.q_stride_b + h * p.q_stride_h + (r % p.Q) * p.q_stride_q;
                                          });

  const int key = tid % kTileKeys, group = tid / kTileKeys;
  const int first_row = group * kRowsPerThread;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int pv_row = tid / kLanesPerRow, pv_lane = tid % kLanesPerRow;
  const int j_begin = split * keys_per_split;
  // Slots past the last one any row of this tile may see are skipped.
  const int j_end = min_of(min_of(j_begin + keys_per_split, p.Lc), offset + max_inner_index(r0, r_end, p.Q) + 1);

  float acc[kDvChunks];
#pragma unroll
  for (int c = 0; c < kDvChunks; ++c) acc[c] = 0.f;

  for (int j0 = j_begin; j0 < j_end; j0 += kTileKeys) {
    __syncthreads();  // k_s, v_s and p_s of the previous tile are no longer read
    // Dead slots load as zeros: their probability is 0, and 0 * NaN would be NaN.
    const auto kv_row = [&](const scalar_t* base, int64_t stride_b, int64_t stride_h, int64_t stride_l) {
      return [=](int i) -> const scalar_t* {
        const int j = j0 + i;
        const bool live = j < j_end && (p.kv_valid == nullptr ||
                                        p.kv_valid[b * p.valid_stride_b + hkv * p.valid_stride_h + j * p.valid_stride_l]);
        return live ? base + b * stride_b + hkv * stride_h + j * stride_l : nullptr;
      };
    };
    load_rows_to_shared<kThreads, scalar_t>(k_s, p.padded_d + 1, kTileKeys, p.D, p.padded_d, p.k_vec16,
                                            kv_row(p.keys, p.k_stride_b, p.k_stride_h, p.k_stride_l));
    load_rows_to_shared<kThreads, scalar_t>(v_s, p.Dv, kTileKeys, p.Dv, p.Dv, p.v_vec16,
                                            kv_row(p.values, p.v_stride_b, p.v_stride_h, p.v_stride_l));
    if (tid < kTileKeys) {
      const int j = j0 + tid;
      key_ok[tid] = j < j_end && (p.kv_valid == nullptr ||
                                  p.kv_valid[b * p.valid_stride_b + hkv * p.valid_stride_h + j * p.valid_stride_l]);
    }
    __syncthreads();  // tiles ready (and, on the first tile, the query tile and row data)

    float dot[kRowsPerThread];
    tile_dots<kRowsPerThread>(q_s, k_s, p.padded_d, first_row, key, dot);
    const int j = j0 + key;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = first_row + i;
      p_s[row * kProbStride + key] = (key_ok[key] && j <= row_last[row]) ? dot[i] * p.scale : -INFINITY;
    }
    __syncthreads();

    // Online softmax: warp w owns rows w * kRowsPerThread + i, lane = key.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int row = warp * kRowsPerThread + i;
      const float s = p_s[row * kProbStride + lane];
      const float m_old = row_max[row];
      const float m_new = fmaxf(m_old, warp_max(s));
      // m_new = -inf: nothing allowed so far; exp(-inf - -inf) would be NaN.
      const float prob = m_new == -INFINITY ? 0.f : expf(s - m_new);
      const float tile_sum = warp_sum(prob);
      p_s[row * kProbStride + lane] = prob;
      __syncwarp();  // every lane has read row_max[row] before lane 0 replaces it
      if (lane == 0) {
        const float rescale = m_new == -INFINITY ? 1.f : expf(m_old - m_new);
        row_max[row] = m_new;
        row_sum[row] = row_sum[row] * rescale + tile_sum;
        row_rescale[row] = rescale;
      }
    }
    __syncthreads();

    const float rescale = row_rescale[pv_row];
#pragma unroll
    for (int c = 0; c < kDvChunks; ++c) acc[c] *= rescale;
    const float* p_row = p_s + pv_row * kProbStride;
    for (int k = 0; k < kTileKeys; ++k) {
      const float prob = p_row[k];
      const float* v_row = v_s + k * p.Dv;
#pragma unroll
      for (int c = 0; c < kDvChunks; ++c) {
        const int d = pv_lane + c * kLanesPerRow;
        if (d < p.Dv) acc[c] = fmaf(prob, v_row[d], acc[c]);
      }
    }
  }
  __syncthreads();  // row_max / row_sum final (also when this split had no key tile)

  const int r = r0 + pv_row;
  if (r >= rows) return;
  const int64_t out_row = static_cast<int64_t>(bh) * rows + r;
  const float m = row_max[pv_row], l = row_sum[pv_row];
  if (nsplit == 1) {
    const float weight = output_weight(m, m == -INFINITY ? 0.f : nsoftmax_log_denominator(m, l, p.use_n, p.log_n));
    scalar_t* dst = out + out_row * p.Dv;
#pragma unroll
    for (int c = 0; c < kDvChunks; ++c) {
      const int d = pv_lane + c * kLanesPerRow;
      if (d < p.Dv) dst[d] = static_cast<scalar_t>(acc[c] * weight);
    }
  } else {
    const int64_t part = out_row * nsplit + split;
    if (pv_lane == 0) part_stats[part] = make_float2(m, l);
    float* dst = part_acc + part * p.Dv;
#pragma unroll
    for (int c = 0; c < kDvChunks; ++c) {
      const int d = pv_lane + c * kLanesPerRow;
      if (d < p.Dv) dst[d] = acc[c];
    }
  }
}

// Merges the key splits of each query row: weight_i = exp(m_i - log_den) with
// log_den the n-softmax denominator of the whole row, out = sum_i weight_i acc_i.
// grid (B * Hkv * G * Q), block kCombineThreads.
template <typename scalar_t>
__global__ void __launch_bounds__(attention::kCombineThreads)
    attention_combine_kernel(const float2* __restrict__ part_stats,  // [rows, nsplit]
                             const float* __restrict__ part_acc,     // [rows, nsplit, Dv]
                             int nsplit, int Dv, bool use_n, float log_n,
                             scalar_t* __restrict__ out)             // [B, H, Q, Dv] = [rows, Dv]
{
  __shared__ float weight[attention::kMaxSplits];
  const int64_t row = blockIdx.x;
  const float2* stats = part_stats + row * nsplit;
  // Every thread merges the same statistics in the same order: same result.
  float m = -INFINITY, l = 0.f;
  for (int i = 0; i < nsplit; ++i) merge_softmax_stats(m, l, stats[i].x, stats[i].y);
  const float log_den = m == -INFINITY ? 0.f : nsoftmax_log_denominator(m, l, use_n, log_n);
  for (int i = threadIdx.x; i < nsplit; i += blockDim.x) weight[i] = m == -INFINITY ? 0.f : expf(stats[i].x - log_den);
  __syncthreads();
  const float* acc = part_acc + row * nsplit * Dv;
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
    float o = 0.f;
    for (int i = 0; i < nsplit; ++i) o = fmaf(weight[i], acc[static_cast<int64_t>(i) * Dv + d], o);
    out[row * Dv + d] = static_cast<scalar_t>(o);
  }
}

}  // namespace cuda
}  // namespace cspkv
