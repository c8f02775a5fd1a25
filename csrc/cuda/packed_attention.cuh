// packed_attention on a GPU: one block per query row (b, query head, t) over
// its KV head's segment of the packed cache. Keys are visited kThreads at a
// time: each thread scores one key (its dot product with the query, held in
// shared memory), the block reduces the chunk's max and sum and folds them
// into an online softmax, then each thread accumulates the value dims it
// owns (d = tid, tid + kThreads, ...: coalesced value reads). Float32
// accumulation for every dtype.
//
// A simple kernel by design: segments differ in length, so a block's work is
// its own segment's length, and rows of one segment share nothing but L2.
// Measured numbers belong in benchmarks/results/ once a GPU has run it.
#pragma once

#include "common.cuh"

namespace cspkv {
namespace cuda {
namespace packed {

constexpr int kThreads = 128;  // keys per chunk; value dims per sweep
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxDvPerThread = kMaxHeadDim / kThreads;

template <typename scalar_t>
struct Params {
  const scalar_t* q;           // [B, H, T, D], last dim contiguous
  const scalar_t* key_data;    // [N, D], rows k_stride apart
  const scalar_t* value_data;  // [N, Dv], rows v_stride apart
  const int64_t* offsets;      // [B * Hkv]
  const int64_t* lengths;      // [B * Hkv]
  scalar_t* out;               // [B, H, T, Dv] contiguous
  int64_t q_stride_b, q_stride_h, q_stride_t;
  int64_t k_stride, v_stride;
  int64_t N;
  int H, Hkv, T, D, Dv;
  float scale;
  bool use_n;
  float log_n;
};

// The block's max (op = max) or sum of one value per thread; every thread gets it.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {  // scratch: kWarps floats
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // scratch may still be read from the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

}  // namespace packed

// grid (B * H * T), block packed::kThreads; dynamic shared memory: D floats (the query).
template <typename scalar_t>
__global__ void __launch_bounds__(packed::kThreads) packed_attention_kernel(const packed::Params<scalar_t> p) {
  using namespace packed;
  extern __shared__ float q_s[];  // [D]
  __shared__ float p_s[kThreads];
  __shared__ float scratch[kWarps];
  const int64_t row = blockIdx.x;  // ((b * H + h) * T + t)
  const int t = static_cast<int>(row % p.T);
  const int64_t bh = row / p.T;
  const int h = static_cast<int>(bh % p.H);
  const int64_t b = bh / p.H;
  const int64_t segment = b * p.Hkv + h / (p.H / p.Hkv);
  const int tid = threadIdx.x;

  // Segments outside [0, N) are not checked on a GPU (that would need a sync): such a row reads nothing.
  const int64_t offset = p.offsets[segment], length = p.lengths[segment];
  const bool inside = offset >= 0 && length >= 0 && offset + length <= p.N;
  const int64_t end = inside ? min_of<int64_t>(length, length - p.T + t + 1) : 0;

  const scalar_t* q_row = p.q + b * p.q_stride_b + h * p.q_stride_h + t * p.q_stride_t;
  for (int d = tid; d < p.D; d += kThreads) q_s[d] = static_cast<float>(q_row[d]);
  __syncthreads();

  float m = -INFINITY, l = 0.f;
  float acc[kMaxDvPerThread];
#pragma unroll
  for (int i = 0; i < kMaxDvPerThread; ++i) acc[i] = 0.f;
  const scalar_t* keys = p.key_data + (inside ? offset : 0) * p.k_stride;
  const scalar_t* values = p.value_data + (inside ? offset : 0) * p.v_stride;

  for (int64_t j0 = 0; j0 < end; j0 += kThreads) {
    const int64_t j = j0 + tid;
    float s = -INFINITY;
    if (j < end) {
      const scalar_t* k_row = keys + j * p.k_stride;
      float dot = 0.f;
      for (int d = 0; d < p.D; ++d) dot += q_s[d] * static_cast<float>(k_row[d]);
      s = dot * p.scale;
    }
    const float chunk_max = block_reduce<true>(s, scratch);
    const float m_new = fmaxf(m, chunk_max);  // finite: the chunk holds at least one key
    const float e = j < end ? expf(s - m_new) : 0.f;
    p_s[tid] = e;
    const float chunk_sum = block_reduce<false>(e, scratch);  // its barriers publish p_s
    const float alpha = m == -INFINITY ? 0.f : expf(m - m_new);
    l = l * alpha + chunk_sum;
    m = m_new;
    const int n_keys = static_cast<int>(min_of<int64_t>(kThreads, end - j0));
#pragma unroll
    for (int i = 0; i < kMaxDvPerThread; ++i) {
      const int d = tid + i * kThreads;
      if (d >= p.Dv) break;
      float a = acc[i] * alpha;
      for (int k = 0; k < n_keys; ++k) a += p_s[k] * static_cast<float>(values[(j0 + k) * p.v_stride + d]);
      acc[i] = a;
    }
    __syncthreads();  // p_s is rewritten by the next chunk
  }

  const float factor = m == -INFINITY ? 0.f : expf(m - nsoftmax_log_denominator(m, l, p.use_n, p.log_n));
  scalar_t* out_row = p.out + row * p.Dv;
#pragma unroll
  for (int i = 0; i < kMaxDvPerThread; ++i) {
    const int d = tid + i * kThreads;
    if (d >= p.Dv) break;
    out_row[d] = static_cast<scalar_t>(acc[i] * factor);
  }
}

}  // namespace cuda
}  // namespace cspkv
