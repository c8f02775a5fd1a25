// Keep selection (cspkv.reference.select_keep), one block per (b, hkv) row.
//
// A row with more real tokens than the budget keeps
//   recent:  its last `recent` real tokens,
//   cross:   the k_cross best remaining candidates (real, not recent) by cross score,
//   self:    the k_self best candidates left after that, by self score,
// ties to the lower index. Each top-k is a radix select on order-preserving
// 32-bit keys (4 digits of 8 bits: histogram in shared memory, warp 0 finds
// the digit with a suffix scan over the bins) that yields the k-th best key T
// and how many candidates with key exactly T are taken; candidates with key
// > T are marked, and the first `need` with key == T in index order. A row
// with at most `budget` real tokens keeps all of them plus its first padding
// slots. Kept positions are written in ascending order.
//
// Warp w owns one contiguous range of positions (`warp_range`), walked 32 at
// a time with lane i on position base + i (coalesced), so a position's rank
// in index order is a block-wide scan of per-warp counts plus a ballot count
// inside the warp: four block scans per row in all, whatever L. Per-position
// state is one byte (kOther / kCandidate / kPicked) in shared memory when
// L <= kSharedFlagLimit, else in a global scratch row; position j is only
// ever touched by the one lane that walks it, so the flags need no
// synchronisation of their own.
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

// The positions [lo, hi) this thread's warp owns: a whole number of 32-position
// steps each (the last warps fewer, or none).
struct WarpRange {
  int lo, hi;
};

template <int kThreads>
__device__ __forceinline__ WarpRange warp_range(int L) {
  constexpr int kWarps = kThreads / kWarp;
  const int chunk = ceil_div(ceil_div(L, kWarps), kWarp) * kWarp;
  const int lo = min_of(L, static_cast<int>(threadIdx.x / kWarp) * chunk);
  return {lo, lo + min_of(chunk, L - lo)};
}

// Index-order ranks of the positions of a warp range that satisfy a
// predicate: `rank_in_order(range, base, pred, use)` walks the range 32
// positions a step and calls use(j, rank) for each j with pred(j) true, rank =
// base + the number of such positions before j in the range. base must be the
// count in the ranges before this one (count_before_warp).
template <typename Pred, typename Use>
__device__ __forceinline__ void rank_in_order(WarpRange range, int base, Pred pred, Use use) {
  const int lane = threadIdx.x % kWarp;
  const unsigned below = (1u << lane) - 1u;
  for (int j0 = range.lo; j0 < range.hi; j0 += kWarp) {
    const int j = j0 + lane;
    const bool hit = j < range.hi && pred(j);
    const unsigned hits = __ballot_sync(kFullMask, hit);
    if (hit) use(j, base + __popc(hits & below));
    base += __popc(hits);
  }
}

// How many positions of every warp range before this warp's satisfy `pred`
// (and *total: in all ranges). Every thread of the block must call it.
template <int kThreads, typename Pred>
__device__ __forceinline__ int count_before_warp(WarpRange range, Pred pred, int* scan_scratch, int* total) {
  int count = 0;
  for (int j = range.lo + static_cast<int>(threadIdx.x % kWarp); j < range.hi; j += kWarp) count += pred(j) ? 1 : 0;
  const int before_thread = block_exclusive_scan<kThreads>(count, scan_scratch, total);
  return __shfl_sync(kFullMask, before_thread, 0);  // lane 0's: the ranges before this warp's
}

// Warp 0 (all 32 lanes) fixes the next digit of the k-th best key: of the
// bins matching the prefix, the highest digit d whose suffix count
// hist[d] + hist[d + 1] + ... reaches `need`. Each lane sums 8 bins, a shuffle
// scan gives the suffix sums per lane, the highest lane that reaches `need`
// walks its own 8 bins.
__device__ __forceinline__ void pick_digit(const uint32_t* hist, int shift, uint32_t prefix, uint32_t* shared_prefix,
                                           int* shared_need) {
  constexpr int kPerLane = select::kRadixBins / kWarp;
  const int lane = threadIdx.x;
  const int need = *shared_need;
  int own = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) own += static_cast<int>(hist[lane * kPerLane + i]);
  int suffix = own;  // bins of lanes lane, lane + 1, ..., 31
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int down = __shfl_down_sync(kFullMask, suffix, offset);
    if (lane + offset < kWarp) suffix += down;
  }
  // Lane 0's suffix is every matching candidate, at least `need` (invariant
  // of pick_top_k), so some lane reaches it.
  const unsigned reach = __ballot_sync(kFullMask, suffix >= need);
  const int owner = kWarp - 1 - __clz(static_cast<int>(reach));
  __syncwarp();  // every lane has read *shared_need before the owner rewrites it
  if (lane == owner) {
    int left = need - (suffix - own);  // still to take inside this lane's bins
    int digit = lane * kPerLane + kPerLane - 1;
    for (; digit > lane * kPerLane; --digit) {  // the lowest bin is taken when reached
      const int count = static_cast<int>(hist[digit]);
      if (count >= left) break;
      left -= count;
    }
    *shared_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    *shared_need = left;
  }
}

// Marks the k best kCandidate positions by `scores` as kPicked, ties to the
// lower index. Requires 1 <= k <= number of candidates. Called by every thread.
template <int kThreads>
__device__ void pick_top_k(const float* __restrict__ scores,  // [L], one row
                           uint8_t* flags,                    // [L], shared or global
                           WarpRange range, int k,
                           uint32_t* hist,                    // [kRadixBins] shared
                           int* scan_scratch,                 // [kWarp] shared
                           uint32_t* shared_prefix, int* shared_need) {
  static_assert(kThreads >= kWarp, "warp 0 picks the digits");
  const int tid = threadIdx.x, lane = tid % kWarp;
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
    for (int j0 = range.lo; j0 < range.hi; j0 += kWarp) {
      const int j = j0 + lane;
      int bin = -1;
      if (j < range.hi && flags[j] == select::kCandidate) {
        const uint32_t key = score_key(scores[j]);
        if ((key & mask) == prefix) bin = static_cast<int>((key >> shift) & 0xffu);
      }
      // Neighbouring scores often share a digit: one atomic per distinct bin of the warp.
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();  // histogram complete; everyone has read prefix
    if (tid < kWarp) pick_digit(hist, shift, prefix, shared_prefix, shared_need);
    __syncthreads();  // new prefix / need visible; warp 0 no longer reads hist
  }
  const uint32_t threshold = *shared_prefix;  // key of the k-th best candidate
  const int need = *shared_need;              // candidates with key == threshold to take
  // Key 0 (NaN) can be the threshold: only candidates count as ties.
  auto tie = [&](int j) { return flags[j] == select::kCandidate && score_key(scores[j]) == threshold; };
  int all_ties;
  const int ties_before = count_before_warp<kThreads>(range, tie, scan_scratch, &all_ties);
  rank_in_order(range, ties_before, tie, [&](int j, int rank) {
    if (rank < need) flags[j] = select::kPicked;
  });
  for (int j = range.lo + lane; j < range.hi; j += kWarp) {
    if (flags[j] == select::kCandidate && score_key(scores[j]) > threshold) flags[j] = select::kPicked;
  }
}

// grid (B * Hkv), block select::kThreads, dynamic shared memory L bytes when
// flags_global is null (L <= kSharedFlagLimit), else none.
template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
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

  const int bh = blockIdx.x;
  const int b = bh / Hkv;
  const WarpRange range = warp_range<kThreads>(L);
  const int32_t* mods = k_mod + static_cast<int64_t>(b) * L;
  uint8_t* flags = flags_global != nullptr ? flags_global + static_cast<int64_t>(bh) * L : select_flags_shared;
  int64_t* out_idx = keep_idx + static_cast<int64_t>(bh) * budget;
  bool* out_valid = keep_valid + static_cast<int64_t>(bh) * budget;

  auto real = [&](int j) { return mods[j] >= 0; };
  int n_real;
  const int real_before = count_before_warp<kThreads>(range, real, scan_scratch, &n_real);

  if (n_real <= budget) {
    // Keep every real token and the first quota = budget - n_real padding
    // slots (padding rank, 0-based, < quota): exactly budget slots, as
    // n_pad = L - n_real >= quota. n_real is per batch row, so the branch is
    // block-uniform. The positions before this warp's range hold real_before
    // real tokens, hence lo - real_before padding ones.
    const int quota = budget - n_real;
    const int lane = threadIdx.x % kWarp;
    const unsigned below = (1u << lane) - 1u;
    int pads_before = range.lo - real_before;
    int kept_before = real_before + min_of(pads_before, quota);
    for (int j0 = range.lo; j0 < range.hi; j0 += kWarp) {
      const int j = j0 + lane;
      const bool is_real = j < range.hi && real(j);
      const bool is_pad = j < range.hi && !is_real;
      const unsigned pads = __ballot_sync(kFullMask, is_pad);
      const bool keep = is_real || (is_pad && pads_before + __popc(pads & below) < quota);
      const unsigned kept = __ballot_sync(kFullMask, keep);
      if (keep) {
        const int slot = kept_before + __popc(kept & below);
        out_idx[slot] = j;
        out_valid[slot] = is_real;
      }
      pads_before += __popc(pads);
      kept_before += __popc(kept);
    }
    return;
  }

  // Recent tokens: the real ones with at least n_real - recent real tokens
  // before them (rank from the end < recent). The rest of the real tokens
  // are candidates: n_real - recent > budget - recent >= k_cross + k_self.
  const int recent_from = n_real - recent;
  for (int j = range.lo + static_cast<int>(threadIdx.x % kWarp); j < range.hi; j += kWarp) flags[j] = select::kOther;
  rank_in_order(range, real_before, real, [&](int j, int rank) {
    flags[j] = rank >= recent_from ? select::kPicked : select::kCandidate;
  });
  const int64_t row = static_cast<int64_t>(bh) * L;
  if (k_cross > 0) pick_top_k<kThreads>(cross_scores + row, flags, range, k_cross, hist, scan_scratch, &shared_prefix, &shared_need);
  if (k_self > 0) pick_top_k<kThreads>(self_scores + row, flags, range, k_self, hist, scan_scratch, &shared_prefix, &shared_need);

  // recent + k_cross + k_self = budget positions are kPicked, written in index order.
  auto picked = [&](int j) { return flags[j] == select::kPicked; };
  int all_picked;
  const int picked_before = count_before_warp<kThreads>(range, picked, scan_scratch, &all_picked);
  rank_in_order(range, picked_before, picked, [&](int j, int slot) {
    out_idx[slot] = j;
    out_valid[slot] = true;
  });
}

}  // namespace cuda
}  // namespace cspkv
