// n-softmax attention for few query rows per KV head (decode: G * Q <= 8),
// half / bfloat16 with 16-byte aligned rows. attention_split_kernel
// (nsoftmax_attention.cuh) tiles 16 query rows per block, so with one row per
// KV head (MHA decode) it wastes most of its work; here every lane streams
// K and V rows straight from global memory into registers.
//
// attention_decode_kernel: grid (nsplit, B * Hkv), block kThreads (4 warps).
// A half-warp owns one key: its 16 lanes hold 8 consecutive head-dim elements
// each per chunk of 128 (a 16-byte load), reduce the kRows dot products with 4
// shuffles and swap logits with the other half, so both halves run the same
// online softmax over key pairs; each half accumulates its own key's value
// row. A warp loads kUnroll key pairs before computing on them (memory-level
// parallelism), warps interleave over the split's keys, and the 4 warps'
// (max, sum, accumulator) are merged in shared memory. The block writes the
// output (one split) or the same per-split partials as attention_split_kernel,
// which attention_combine_kernel merges.
#pragma once

#include "common.cuh"
#include "nsoftmax_attention.cuh"

namespace cspkv {
namespace cuda {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kHalfLanes = kWarp / 2;  // lanes per key
constexpr int kVec = 8;                // 16-bit elements per lane and chunk (one 16-byte load)
constexpr int kChunkDims = kHalfLanes * kVec;  // head-dim elements one chunk covers: 128
constexpr int kMaxRows = 8;

// Key pairs a warp loads before computing: fewer with many rows (registers).
constexpr int unroll(int rows) {
  return rows >= 8 ? 2 : 4;
}

// Query rows padded to the kernel's kRows; 0 when the decode kernel does not apply.
constexpr int rows_instance(int rows) {
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= kMaxRows ? 8 : 0;
}

// Registers per lane: kRows * kChunks * kVec floats for the queries and as
// many for the accumulator; bounded so that the kernel does not spill.
constexpr bool fits(int rows, int chunks) {
  return rows_instance(rows) > 0 && chunks >= 1 && chunks <= 2 && rows_instance(rows) * chunks * kVec <= 64;
}

// The 8 elements of a 16-byte word of half / bfloat16 values as floats.
template <typename scalar_t>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kVec]) {
  scalar_t vals[kVec];
  memcpy(vals, &raw, sizeof(raw));
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = static_cast<float>(vals[e]);
}

}  // namespace decode

template <typename scalar_t, int kRows, int kChunks>
__global__ void __launch_bounds__(decode::kThreads)
    attention_decode_kernel(const AttentionParams<scalar_t> p,
                            int keys_per_split,
                            int nsplit,
                            float2* __restrict__ part_stats,  // [B * Hkv * G * Q, nsplit] (max, sum); unused if nsplit == 1
                            float* __restrict__ part_acc,     // [B * Hkv * G * Q, nsplit, Dv]; unused if nsplit == 1
                            scalar_t* __restrict__ out)       // [B, H, Q, Dv]; written only if nsplit == 1
{
  using namespace decode;
  static_assert(sizeof(scalar_t) == 2, "16-bit elements: 8 per 16-byte load");
  constexpr int kUnroll = unroll(kRows);
  constexpr int kSpan = kChunks * kChunkDims;
  __shared__ float warp_max_s[kWarps][kRows], warp_sum_s[kWarps][kRows];
  __shared__ float warp_acc[kWarps][kRows][kSpan];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int half = lane / kHalfLanes, sub = lane % kHalfLanes;
  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.Hkv, hkv = bh % p.Hkv;
  const int rows = p.G * p.Q;
  const int offset = p.Lc - p.Q;  // query i sits at cache slot offset + i
  const int j_begin = split * keys_per_split;
  const int j_end = min_of(j_begin + keys_per_split, p.Lc);
  const float scale_log2 = p.scale * kLog2e;

  // This lane's query elements, scaled so that dot products are base-2 logits.
  float q[kRows][kChunks][kVec];
  int last[kRows];  // last slot the row may see; -1 for padded rows
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const scalar_t* q_row = nullptr;
    last[r] = -1;
    if (r < rows) {
      q_row = p.q + b * p.q_stride_b + (hkv * p.G + r / p.Q) * p.q_stride_h + (r % p.Q) * p.q_stride_q;
      last[r] = offset + r % p.Q;
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d0 = c * kChunkDims + sub * kVec;
      if (q_row != nullptr && d0 < p.D) {
        decode::unpack<scalar_t>(*reinterpret_cast<const uint4*>(q_row + d0), q[r][c]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) q[r][c][e] *= scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) q[r][c][e] = 0.f;
      }
    }
  }

  float m[kRows], l[kRows], acc[kRows][kChunks][kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[r][c][e] = 0.f;
    }
  }

  const scalar_t* k_base = p.keys + b * p.k_stride_b + hkv * p.k_stride_h;
  const scalar_t* v_base = p.values + b * p.v_stride_b + hkv * p.v_stride_h;
  constexpr int kWarpKeys = 2 * kUnroll;
  for (int j0 = j_begin + warp * kWarpKeys; j0 < j_end; j0 += kWarps * kWarpKeys) {
    // Issue every load of the kUnroll key pairs first. Dead slots load as
    // zeros: their probability is 0, and 0 * NaN would be NaN.
    uint4 k_raw[kUnroll][kChunks], v_raw[kUnroll][kChunks];
    bool live[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + 2 * u + half;
      live[u] = j < j_end && (p.kv_valid == nullptr ||
                              p.kv_valid[b * p.valid_stride_b + hkv * p.valid_stride_h + j * p.valid_stride_l]);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d0 = c * kChunkDims + sub * kVec;
        k_raw[u][c] = live[u] && d0 < p.D ? *reinterpret_cast<const uint4*>(k_base + j * p.k_stride_l + d0) : uint4{};
        v_raw[u][c] = live[u] && d0 < p.Dv ? *reinterpret_cast<const uint4*>(v_base + j * p.v_stride_l + d0) : uint4{};
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + 2 * u + half;
      float s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = 0.f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float k[kVec];
        decode::unpack<scalar_t>(k_raw[u][c], k);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) s[r] = fmaf(q[r][c][e], k[e], s[r]);
        }
      }
      float s_other[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int off = kHalfLanes / 2; off > 0; off /= 2) s[r] += __shfl_xor_sync(kFullMask, s[r], off);
        s[r] = live[u] && j <= last[r] ? s[r] : -INFINITY;
        s_other[r] = __shfl_xor_sync(kFullMask, s[r], kHalfLanes);  // the other half's key
      }
      float v[kChunks][kVec];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) decode::unpack<scalar_t>(v_raw[u][c], v[c]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float m_new = fmaxf(m[r], fmaxf(s[r], s_other[r]));
        if (m_new == -INFINITY) continue;  // nothing allowed yet: exp2(-inf - -inf) would be NaN
        const float rescale = exp2f(m[r] - m_new);
        const float p_own = exp2f(s[r] - m_new);
        l[r] = l[r] * rescale + p_own + exp2f(s_other[r] - m_new);
        m[r] = m_new;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[r][c][e] = fmaf(p_own, v[c][e], acc[r][c][e] * rescale);
        }
      }
    }
  }

  // Both halves share (m, l); their accumulators hold different keys.
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[r][c][e] += __shfl_xor_sync(kFullMask, acc[r][c][e], kHalfLanes);
    }
  }
  if (half == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) warp_acc[warp][r][c * kChunkDims + sub * kVec + e] = acc[r][c][e];
      }
      if (sub == 0) {
        warp_max_s[warp][r] = m[r];
        warp_sum_s[warp][r] = l[r];
      }
    }
  }
  __syncthreads();

  // Merge the warps: thread per (row, output column).
  for (int idx = tid; idx < rows * p.Dv; idx += kThreads) {
    const int r = idx / p.Dv, d = idx % p.Dv;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, warp_max_s[w][r]);
    float sum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(warp_max_s[w][r] - mx);  // 0 for a warp without allowed keys
        sum = fmaf(weight, warp_sum_s[w][r], sum);
        a = fmaf(weight, warp_acc[w][r][d], a);
      }
    }
    const float m_nat = mx * kLn2;  // natural-log statistics, as attention_combine_kernel reads them
    const int64_t out_row = static_cast<int64_t>(bh) * rows + r;
    if (nsplit == 1) {
      const float log_den = m_nat == -INFINITY ? 0.f : nsoftmax_log_denominator(m_nat, sum, p.use_n, p.log_n);
      out[out_row * p.Dv + d] = static_cast<scalar_t>(a * output_weight(m_nat, log_den));
    } else {
      const int64_t part = out_row * nsplit + split;
      if (d == 0) part_stats[part] = make_float2(m_nat, sum);
      part_acc[part * p.Dv + d] = a;
    }
  }
}

}  // namespace cuda
}  // namespace cspkv
