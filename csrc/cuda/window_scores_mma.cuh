// Tensor-core window scores for half / bfloat16 inputs (sm_80+): the same two
// passes as window_scores.cuh, with every Q.K^T tile an m16n8k16 MMA in
// float and tiles staged by cp.async, double-buffered.
//
//   1. window_row_stats_mma_kernel: a block holds 128 query rows (16 per
//      warp, as MMA A fragments in registers) and streams the keys of one
//      split in tiles of 64; each thread keeps running (max, sum of exp) of
//      its two rows over its columns, merged across the lane quad at the end.
//      window_row_lse_kernel (window_scores.cuh) then merges the splits.
//   2. window_scores_mma_kernel: a block holds 16 * kMTiles keys per warp (as
//      A fragments: it computes K.Q^T) and streams the query rows in tiles of
//      64, skipping tiles whose rows all sit before its keys; each thread sums
//      the probabilities of its 2 * kMTiles keys into self / cross, merged
//      across the lane quad at the end. Blocks own disjoint keys: no atomics.
//      Two key tiles per warp (kMTiles = 2, kD = 128 only) use each B fragment
//      read from shared memory for twice the MMAs and give each warp twice the
//      independent work, at one block per SM; heuristics.h decides where
//      (window_max_key_tiles, window_two_key_tiles).
//
// Shared memory: the stationary tile (128 or 256 rows) and two streamed tiles
// (64 rows), each row kD + 8 16-bit words: the 16-byte pad puts the 8 rows an
// ldmatrix reads in 8 different bank quads. kD is D rounded up to 64, 128 or
// 256; the extra columns are zero-filled. Rows must be 16-byte aligned with
// D % 8 == 0 (the binding checks, else uses window_scores.cuh).
#pragma once

#include "common.cuh"
#include "mma.cuh"
#include "window_scores.cuh"

namespace cspkv {
namespace cuda {
namespace window_mma {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kStationary = 16 * kWarps;  // pass 1: query rows held as A fragments, 16 per warp
constexpr int kStreamed = 64;             // rows per streamed tile: 8 MMA n-tiles

constexpr int padded_dim(int d) {
  return d <= 64 ? 64 : (d <= 128 ? 128 : 256);
}

// Keys a pass-2 block holds.
constexpr int score_keys(int m_tiles) {
  return 16 * m_tiles * kWarps;
}
constexpr int kMaxScoreKeys = score_keys(2);

// Blocks per SM the register budget is cut for: two for one 16-row tile per
// warp up to kD = 128 (at most 128 registers a thread), else one (kD = 256:
// the A fragments alone take 64 registers; two tiles per warp: 128).
constexpr int min_blocks(int kd, int m_tiles) {
  return kd <= 128 && m_tiles == 1 ? 2 : 1;
}

inline size_t shared_memory_bytes(int kd, int stationary_rows) {
  return sizeof(uint16_t) * static_cast<size_t>(stationary_rows + 2 * kStreamed) * (kd + 8);
}

// Starts copying kRows rows of D 16-bit words into tile (stride kD + 8);
// row_ptr(i) gives row i's source, nullptr for a row to zero-fill, as are
// columns [D, kD). `any_row` is a valid address for the zero-fill copies.
template <int kD, int kRows, typename RowPtr>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, int D, const uint16_t* any_row, RowPtr row_ptr) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < kRows * kChunks; e += kThreads) {
    const int row = e / kChunks, chunk = e % kChunks;
    const uint16_t* src = row_ptr(row);
    const bool valid = src != nullptr && chunk * 8 < D;
    mma::cp_async_16(tile + row * (kD + 8) + chunk * 8, valid ? src + chunk * 8 : any_row, valid);
  }
}

// This warp's kMTiles x 16 rows of the stationary tile (from row warp * 16 *
// kMTiles) as A fragments, one per 16 rows and 16 columns.
template <int kD, int kMTiles>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[kMTiles][kD / 16][4], const uint16_t* tile, int warp,
                                                 int lane) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const uint16_t* row = tile + ((warp * kMTiles + mt) * 16 + lane % 16) * (kD + 8) + (lane / 16) * 8;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) mma::ldmatrix_x4(a[mt][ks], row + ks * 16);
  }
}

// acc[mt][nt] = this warp's stationary rows [16 mt, 16 mt + 16) . streamed
// rows [8 nt, 8 nt + 8)^T over kD columns, in the C fragment layout (see mma.cuh).
template <bool kBF16, int kD, int kMTiles>
__device__ __forceinline__ void warp_tile_dots(const uint32_t (&a)[kMTiles][kD / 16][4], const uint16_t* streamed,
                                               int lane, float (&acc)[kMTiles][kStreamed / 8][4]) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kStreamed / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    }
  }
  // ldmatrix x4 matrices: (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15)
  // of a pair of n-tiles, i.e. the two B registers of n-tile 2 np, then of 2 np + 1.
  const uint16_t* row = streamed + (lane % 8 + 8 * (lane / 16)) * (kD + 8) + 8 * ((lane / 8) % 2);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
    for (int np = 0; np < kStreamed / 16; ++np) {
      uint32_t b[4];
      mma::ldmatrix_x4(b, row + np * 16 * (kD + 8) + ks * 16);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma::mma_16816<kBF16>(acc[mt][2 * np], a[mt][ks], b[0], b[1]);
        mma::mma_16816<kBF16>(acc[mt][2 * np + 1], a[mt][ks], b[2], b[3]);
      }
    }
  }
}

}  // namespace window_mma

// Pass 1. grid (ceil(G*W / kStationary), nsplit, B * Hkv), block kThreads.
// Writes the same row_stats as window_row_stats_kernel.
template <bool kBF16, int kD>
__global__ void __launch_bounds__(window_mma::kThreads, window_mma::min_blocks(kD, 1))
    window_row_stats_mma_kernel(const WindowScoresParams<uint16_t> p,
                                int keys_per_split,              // multiple of kStreamed
                                int nsplit,
                                float2* __restrict__ row_stats)  // [B * Hkv, G * W, nsplit] (max, sum exp(s - max))
{
  using namespace window_mma;
  constexpr int kStride = kD + 8;
  extern __shared__ __align__(16) unsigned char window_mma_smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(window_mma_smem);  // [kStationary][kStride]
  uint16_t* k_s = q_s + kStationary * kStride;                    // [2][kStreamed][kStride]
  __shared__ int row_w[kStationary];                              // -1: the row scores nothing
  __shared__ bool key_real[2][kStreamed];                         // false for padding and keys outside the split

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int g = lane / 4, c = lane % 4;
  const int rows = p.G * p.W;
  const int r0 = blockIdx.x * kStationary;
  const int r_end = min_of(r0 + kStationary, rows);
  const int split = blockIdx.y;
  const int bh = blockIdx.z;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int offset = p.L - p.W;  // window row w sits at position offset + w
  const int j_begin = split * keys_per_split;
  const int j_end = split_key_end(p, r0, r_end, j_begin, keys_per_split);

  if (tid < kStationary) row_w[tid] = scoring_window_index(p, b, r0 + tid);
  load_tile_async<kD, kStationary>(q_s, p.D, p.q_win, [&](int i) -> const uint16_t* {
    return r0 + i < rows ? window_query_row(p, b, hkv, r0 + i) : nullptr;
  });
  mma::cp_async_commit();
  auto load_keys = [&](int j0, int buf) {
    load_tile_async<kD, kStreamed>(k_s + buf * kStreamed * kStride, p.D, p.keys, [&](int i) -> const uint16_t* {
      return j0 + i < j_end ? window_key_row(p, b, hkv, j0 + i) : nullptr;
    });
    if (tid < kStreamed) key_real[buf][tid] = j0 + tid < j_end && p.k_mod[static_cast<int64_t>(b) * p.L + j0 + tid] >= 0;
  };
  if (j_begin < j_end) load_keys(j_begin, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<1>();  // the query tile landed
  __syncthreads();
  uint32_t a[1][kD / 16][4];
  load_a_fragments<kD, 1>(a, q_s, warp, lane);
  const int row_window[2] = {row_w[warp * 16 + g], row_w[warp * 16 + g + 8]};
  const float scale_log2 = p.scale * kLog2e;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // per row of this thread, base-2 logits
  int buf = 0;
  for (int j0 = j_begin; j0 < j_end; j0 += kStreamed, buf ^= 1) {
    if (j0 + kStreamed < j_end) load_keys(j0 + kStreamed, buf ^ 1);  // the other buffer was released last iteration
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // tile j0 landed
    __syncthreads();
    float acc[1][kStreamed / 8][4];
    warp_tile_dots<kBF16, kD, 1>(a, k_s + buf * kStreamed * kStride, lane, acc);
    bool key_scores[kStreamed / 4];  // this thread's 16 columns: a real key of the split
#pragma unroll
    for (int nt = 0; nt < kStreamed / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) key_scores[2 * nt + e] = key_real[buf][nt * 8 + 2 * c + e];
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int w = row_window[half];
      if (w < 0) continue;
      // Keys after the row's position exist only in the tile that crosses it.
      const bool causal_cut = j0 + kStreamed - 1 > offset + w;
      float s[kStreamed / 4];
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kStreamed / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = nt * 8 + 2 * c + e;
          const bool allowed = key_scores[2 * nt + e] && !(causal_cut && j0 + i > offset + w);
          const float v = allowed ? acc[0][nt][2 * half + e] * scale_log2 : -INFINITY;
          s[2 * nt + e] = v;
          tile_max = fmaxf(tile_max, v);
        }
      }
      if (tile_max == -INFINITY) continue;
      const float m_new = fmaxf(m[half], tile_max);
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < kStreamed / 4; ++k) sum += exp2_ftz(s[k] - m_new);
      l[half] = l[half] * exp2_ftz(m[half] - m_new) + sum;  // m = -inf before the first allowed key: 0 * 0
      m[half] = m_new;
    }
    __syncthreads();  // every warp is done with buffer buf before it is refilled
  }

  // The 4 lanes of a quad hold the same two rows over different columns.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mi = m[half] * kLn2, li = l[half];  // natural-log statistics, as window_row_lse_kernel reads them
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      const float mo = __shfl_xor_sync(kFullMask, mi, off);
      const float lo = __shfl_xor_sync(kFullMask, li, off);
      merge_softmax_stats(mi, li, mo, lo);
    }
    const int r = r0 + warp * 16 + g + 8 * half;
    if (c == 0 && r < rows) row_stats[(static_cast<int64_t>(bh) * rows + r) * nsplit + split] = make_float2(mi, li);
  }
}

// Pass 2. grid (ceil(L / score_keys(kMTiles)), B * Hkv), block kThreads.
template <bool kBF16, int kD, int kMTiles>
__global__ void __launch_bounds__(window_mma::kThreads, window_mma::min_blocks(kD, kMTiles))
    window_scores_mma_kernel(const WindowScoresParams<uint16_t> p,
                             const float* __restrict__ log_denominator,  // [B * Hkv, G * W] from pass 1b
                             float* __restrict__ self_scores,            // [B, Hkv, L]
                             float* __restrict__ cross_scores)           // [B, Hkv, L]
{
  using namespace window_mma;
  constexpr int kStride = kD + 8;
  constexpr int kKeys = score_keys(kMTiles);
  extern __shared__ __align__(16) unsigned char window_mma_smem[];
  uint16_t* k_s = reinterpret_cast<uint16_t*>(window_mma_smem);  // [kKeys][kStride]
  uint16_t* q_s = k_s + kKeys * kStride;                          // [2][kStreamed][kStride]
  // Per streamed row, one 16-byte read: (last key it sees = its position, -1
  // when the row scores nothing; modality id; log2 of the row's n-softmax
  // denominator; unused).
  __shared__ float4 row_data[2][kStreamed];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int g = lane / 4, c = lane % 4;
  const int rows = p.G * p.W;
  const int j0 = blockIdx.x * kKeys;
  const int bh = blockIdx.y;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int offset = p.L - p.W;

  load_tile_async<kD, kKeys>(k_s, p.D, p.keys, [&](int i) -> const uint16_t* {
    return j0 + i < p.L ? window_key_row(p, b, hkv, j0 + i) : nullptr;
  });
  mma::cp_async_commit();
  // The first row tile at or after r that has a row seeing some key of this
  // block (block-uniform, so every thread takes the same path).
  auto next_needed = [&](int r) {
    while (r < rows && offset + max_inner_index(r, min_of(r + kStreamed, rows), p.w_divmod) < j0) r += kStreamed;
    return r;
  };
  auto load_rows = [&](int r0, int buf) {
    load_tile_async<kD, kStreamed>(q_s + buf * kStreamed * kStride, p.D, p.q_win, [&](int i) -> const uint16_t* {
      return r0 + i < rows ? window_query_row(p, b, hkv, r0 + i) : nullptr;
    });
    if (tid < kStreamed) {
      const int r = r0 + tid;
      const int w = scoring_window_index(p, b, r);
      const int mod = w < 0 ? -1 : p.q_mod[static_cast<int64_t>(b) * p.W + w];
      const float log2_den = w < 0 ? 0.f : log_denominator[static_cast<int64_t>(bh) * rows + r] * kLog2e;
      row_data[buf][tid] = make_float4(__int_as_float(w < 0 ? -1 : offset + w), __int_as_float(mod), log2_den, 0.f);
    }
  };
  int r0 = next_needed(0);
  if (r0 < rows) load_rows(r0, 0);
  mma::cp_async_commit();
  mma::cp_async_wait<1>();  // the key tile landed
  __syncthreads();
  uint32_t a[kMTiles][kD / 16][4];
  load_a_fragments<kD, kMTiles>(a, k_s, warp, lane);
  int key[kMTiles][2], kmod[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      key[mt][half] = j0 + (warp * kMTiles + mt) * 16 + g + 8 * half;
      kmod[mt][half] = key[mt][half] < p.L ? p.k_mod[static_cast<int64_t>(b) * p.L + key[mt][half]] : -1;
    }
  }
  const float scale_log2 = p.scale * kLog2e;

  float self_sum[kMTiles][2] = {}, cross_sum[kMTiles][2] = {};
  int buf = 0;
  while (r0 < rows) {
    const int r_next = next_needed(r0 + kStreamed);
    if (r_next < rows) load_rows(r_next, buf ^ 1);  // the other buffer was released last iteration
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // tile r0 landed
    __syncthreads();
    float acc[kMTiles][kStreamed / 8][4];
    warp_tile_dots<kBF16, kD, kMTiles>(a, q_s + buf * kStreamed * kStride, lane, acc);
    // Branch-free: a key after the row's position, or any key of a row that
    // scores nothing (last key -1), gets probability 0 by a select, so a NaN
    // logit there adds nothing. Padding keys are summed too and written as 0
    // at the end.
#pragma unroll
    for (int nt = 0; nt < kStreamed / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float4 row = row_data[buf][nt * 8 + 2 * c + e];
        const int last_key = __float_as_int(row.x);
        const int mod = __float_as_int(row.y);
        const float log2_den = row.z;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float e2 = exp2_ftz(fmaf(acc[mt][nt][2 * half + e], scale_log2, -log2_den));
            const float prob = key[mt][half] > last_key ? 0.f : e2;
            const bool self = mod == kmod[mt][half];
            self_sum[mt][half] += self ? prob : 0.f;
            cross_sum[mt][half] += self ? 0.f : prob;
          }
        }
      }
    }
    __syncthreads();  // every warp is done with buffer buf before it is refilled
    r0 = r_next;
    buf ^= 1;
  }

  // The 4 lanes of a quad hold the same two keys over different rows.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float s = self_sum[mt][half], x = cross_sum[mt][half];
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        s += __shfl_xor_sync(kFullMask, s, off);
        x += __shfl_xor_sync(kFullMask, x, off);
      }
      if (c == 0 && key[mt][half] < p.L) {
        const int64_t out = static_cast<int64_t>(bh) * p.L + key[mt][half];
        self_scores[out] = kmod[mt][half] < 0 ? 0.f : s;
        cross_scores[out] = kmod[mt][half] < 0 ? 0.f : x;
      }
    }
  }
}

}  // namespace cuda
}  // namespace cspkv
