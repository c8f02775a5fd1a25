// Keep selection (cspkv.reference.select_keep), one block per (b, hkv) row.
//
// A row with more real tokens than the budget keeps
//   recent:  its last `recent` real tokens,
//   cross:   the k_cross best remaining candidates (real, not recent) by cross score,
//   self:    the k_self best candidates left after that, by self score,
// ties to the lower index. Each top-k is a radix select on order-preserving
// 32-bit keys (4 digits of 8 bits: histogram in shared memory, thread 0 picks
// the digit) that yields the k-th best key T and how many candidates with key
// exactly T are taken; a tie-aware block scan in index order then marks the
// candidates with key > T and the first `need` with key == T. A row with at
// most `budget` real tokens keeps all of them plus its first padding slots.
// Kept positions are written in ascending order by a block-wide prefix sum.
//
// Per-position state is one byte (kOther / kCandidate / kPicked) in shared
// memory when L <= kSharedFlagLimit, else in a global scratch row. Position j
// is only ever touched by thread j % kThreads (every pass walks j = tid,
// tid + kThreads, ...), so the flags need no synchronisation of their own.
#pragma once

#include "common.cuh"

namespace cspkv {
namespace cuda {
namespace select {

constexpr int kThreads = 512;
// Flag bytes kept in shared memory: with the static arrays below this stays
// under the 48 KiB a block gets without opting in.
constexpr int kSharedFlagLimit = 32768;
constexpr int kRadixBins = 256;

enum : uint8_t { kOther = 0, kCandidate = 1, kPicked = 2 };

}  // namespace select

// Order-preserving key: for non-NaN a, b, a > b <=> key(a) > key(b) and
// a == b <=> key(a) == key(b), so -0.0 and +0.0 tie (as in the reference,
// which adds 0.0 before sorting). NaN maps to 0, below -inf (key 0x007fffff):
// NaN ranks lowest. (torch.sort, which the reference uses, ranks NaN highest;
// scores from window_scores are NaN only for NaN inputs.)
__device__ __forceinline__ uint32_t score_key(float x) {
  if (x != x) return 0u;
  if (x == 0.f) x = 0.f;  // -0.0 -> +0.0
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Marks the k best kCandidate positions by `scores` as kPicked, ties to the
// lower index. Requires 1 <= k <= number of candidates. Called by every thread.
template <int kThreads>
__device__ void pick_top_k(const float* __restrict__ scores,  // [L], one row
                           uint8_t* flags,                    // [L], shared or global
                           int L, int k,
                           uint32_t* hist,                    // [kRadixBins] shared
                           int* scan_scratch,                 // [kWarp] shared
                           uint32_t* shared_prefix, int* shared_need) {
  const int tid = threadIdx.x;
  __syncthreads();  // everyone is done with *shared_prefix / *shared_need of an earlier call
  if (tid == 0) {
    *shared_prefix = 0u;
    *shared_need = k;
  }
  // Invariant: `need` (>= 1) of the best candidates whose key matches
  // `prefix` in the digits fixed so far remain to be taken, and at least
  // `need` candidates match it.
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < select::kRadixBins; i += kThreads) hist[i] = 0u;
    __syncthreads();  // hist cleared; prefix / need of the previous digit visible
    const uint32_t prefix = *shared_prefix;
    const uint32_t mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int j = tid; j < L; j += kThreads) {
      if (flags[j] != select::kCandidate) continue;
      const uint32_t key = score_key(scores[j]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();  // histogram complete
    if (tid == 0) {
      int need = *shared_need;
      int digit = select::kRadixBins - 1;
      for (; digit > 0; --digit) {  // best digit first; digit 0 is taken when reached (invariant)
        const int count = static_cast<int>(hist[digit]);
        if (count >= need) break;
        need -= count;
      }
      *shared_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      *shared_need = need;
    }
    __syncthreads();  // thread 0 no longer reads hist; new prefix / need visible
  }
  const uint32_t threshold = *shared_prefix;  // key of the k-th best candidate
  const int need = *shared_need;              // candidates with key == threshold to take
  int ties_before = 0;
  for (int base = 0; base < L; base += kThreads) {
    const int j = base + tid;
    const bool candidate = j < L && flags[j] == select::kCandidate;
    const uint32_t key = candidate ? score_key(scores[j]) : 0u;
    const bool tie = candidate && key == threshold;
    int ties_in_tile;
    const int tie_rank = ties_before + block_exclusive_scan<kThreads>(tie ? 1 : 0, scan_scratch, &ties_in_tile);
    if (candidate && (key > threshold || (tie && tie_rank < need))) flags[j] = select::kPicked;
    ties_before += ties_in_tile;
  }
}

// grid (B * Hkv), block select::kThreads, dynamic shared memory L bytes when
// flags_global is null (L <= kSharedFlagLimit), else none.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    select_keep_kernel(const float* __restrict__ self_scores,   // [B, Hkv, L] contiguous
                       const float* __restrict__ cross_scores,  // [B, Hkv, L] contiguous
                       const int32_t* __restrict__ k_mod,       // [B, L] contiguous, -1 = padding
                       uint8_t* __restrict__ flags_global,      // [B * Hkv, L] scratch, or null
                       int64_t* __restrict__ keep_idx,          // [B, Hkv, budget]
                       bool* __restrict__ keep_valid,           // [B, Hkv, budget]
                       int Hkv, int L, int budget, int recent, int k_cross, int k_self) {
  extern __shared__ unsigned char select_flags_shared[];
  __shared__ int scan_scratch[kWarp];
  __shared__ uint32_t hist[select::kRadixBins];
  __shared__ uint32_t shared_prefix;
  __shared__ int shared_need;

  const int tid = threadIdx.x;
  const int bh = blockIdx.x;
  const int b = bh / Hkv;
  const int32_t* mods = k_mod + static_cast<int64_t>(b) * L;
  uint8_t* flags = flags_global != nullptr ? flags_global + static_cast<int64_t>(bh) * L : select_flags_shared;
  int64_t* out_idx = keep_idx + static_cast<int64_t>(bh) * budget;
  bool* out_valid = keep_valid + static_cast<int64_t>(bh) * budget;

  int local_real = 0;
  for (int j = tid; j < L; j += kThreads) local_real += mods[j] >= 0 ? 1 : 0;
  int n_real;
  block_exclusive_scan<kThreads>(local_real, scan_scratch, &n_real);

  if (n_real <= budget) {
    // Keep every real token and the first budget - n_real padding slots
    // (padding rank, 1-based, <= quota): exactly budget slots, as
    // n_pad = L - n_real >= budget - n_real. n_real is per batch row, so the
    // branch is block-uniform.
    const int quota = budget - n_real;
    int pads_before = 0, kept_before = 0;
    for (int base = 0; base < L; base += kThreads) {
      const int j = base + tid;
      const bool real = j < L && mods[j] >= 0;
      const bool pad = j < L && !real;
      int pads_in_tile, kept_in_tile;
      const int pad_rank = pads_before + block_exclusive_scan<kThreads>(pad ? 1 : 0, scan_scratch, &pads_in_tile);
      const bool keep = real || (pad && pad_rank < quota);
      const int slot = kept_before + block_exclusive_scan<kThreads>(keep ? 1 : 0, scan_scratch, &kept_in_tile);
      if (keep) {
        out_idx[slot] = j;
        out_valid[slot] = real;
      }
      pads_before += pads_in_tile;
      kept_before += kept_in_tile;
    }
    return;
  }

  // Recent tokens: the real ones with at least n_real - recent real tokens
  // before them (rank from the end < recent). The rest of the real tokens
  // are candidates: n_real - recent > budget - recent >= k_cross + k_self.
  const int recent_from = n_real - recent;
  int real_before = 0;
  for (int base = 0; base < L; base += kThreads) {
    const int j = base + tid;
    const bool real = j < L && mods[j] >= 0;
    int real_in_tile;
    const int rank = real_before + block_exclusive_scan<kThreads>(real ? 1 : 0, scan_scratch, &real_in_tile);
    if (j < L) flags[j] = !real ? select::kOther : (rank >= recent_from ? select::kPicked : select::kCandidate);
    real_before += real_in_tile;
  }
  const int64_t row = static_cast<int64_t>(bh) * L;
  if (k_cross > 0) pick_top_k<kThreads>(cross_scores + row, flags, L, k_cross, hist, scan_scratch, &shared_prefix, &shared_need);
  if (k_self > 0) pick_top_k<kThreads>(self_scores + row, flags, L, k_self, hist, scan_scratch, &shared_prefix, &shared_need);

  // recent + k_cross + k_self = budget positions are kPicked.
  int picked_before = 0;
  for (int base = 0; base < L; base += kThreads) {
    const int j = base + tid;
    const bool picked = j < L && flags[j] == select::kPicked;
    int picked_in_tile;
    const int slot = picked_before + block_exclusive_scan<kThreads>(picked ? 1 : 0, scan_scratch, &picked_in_tile);
    if (picked) {
      out_idx[slot] = j;
      out_valid[slot] = true;
    }
    picked_before += picked_in_tile;
  }
}

}  // namespace cuda
}  // namespace cspkv
