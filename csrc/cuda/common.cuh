// Device helpers shared by the cspkv CUDA kernels.
//
// Torch-free on purpose (FlashInfer style): kernels take raw pointers and
// strides, the .cu bindings own tensors, checks, dtype dispatch and launches.
// Element types are used only through static_cast<float> / static_cast<scalar_t>,
// so the kernels work with float, c10::Half and c10::BFloat16 alike.
#pragma once

#include <math.h>  // INFINITY, expf, logf, log1pf in device code

#include <cstdint>
#include <cstring>

namespace cspkv {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Kernels that exponentiate with exp2f keep logits in base 2 and convert.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Largest head dim the shared-memory tiles are sized for (the bindings reject more).
constexpr int kMaxHeadDim = 256;

// 2^x as one MUFU.EX2 (ex2.approx.ftz): exp2f also rescues results below
// 2^-126 as denormals, three more instructions per call; a probability that
// small adds nothing to a score or a softmax sum. 2^-inf = 0, 2^NaN = NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__host__ __device__ __forceinline__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Own min/max: CUDA's overload set for mixed or 64-bit integer types differs
// between host and device compilers.
template <typename T>
__host__ __device__ __forceinline__ constexpr T min_of(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
__host__ __device__ __forceinline__ constexpr T max_of(T a, T b) {
  return a < b ? b : a;
}

// n / d and n % d for 0 <= n < 2^31 and a divisor 1 <= d < 2^31 fixed per
// launch, by one 32 x 32 -> 64-bit multiply and a shift instead of an integer
// division (which costs about 20 instructions, one of them on the SFU that the
// kernels' exps need). With l = ceil(log2 d) and p = 31 + l, m = ceil(2^p / d)
// fits 32 bits, and m d - 2^p < d <= 2^l makes floor(n m / 2^p) exact for
// every n < 2^31.
struct FastDivmod {
  int d = 1;
  uint32_t m = 1u << 31;
  int p = 31;

  static FastDivmod make(int divisor) {
    FastDivmod f;
    int l = 0;
    while ((int64_t{1} << l) < divisor) ++l;
    f.d = divisor;
    f.p = 31 + l;
    f.m = static_cast<uint32_t>(((uint64_t{1} << f.p) + static_cast<uint64_t>(divisor) - 1) / static_cast<uint64_t>(divisor));
    return f;
  }
  __device__ __forceinline__ int div(int n) const {
    return static_cast<int>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * m) >> p);
  }
  __device__ __forceinline__ int mod(int n) const { return n - div(n) * d; }
};

// Head dims are padded to a multiple of 4 in shared memory so that query rows
// can be read as float4; the padding columns hold zeros.
__host__ __device__ __forceinline__ constexpr int padded_head_dim(int d) {
  return (d + 3) / 4 * 4;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Merges the softmax statistics (max m, sum of exp(s - m)) of two disjoint
// sets of logits into (m, l). An empty set is (-inf, 0); merging two empty
// sets must not evaluate exp(-inf - -inf) = NaN, hence the early return.
__device__ __forceinline__ void merge_softmax_stats(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  l = l * expf(m - mx) + l2 * expf(m2 - mx);
  m = mx;
}

// log of the n-softmax denominator n + sum_j exp(s_j) of a non-empty row with
// statistics (m, l): logaddexp(m + log l, log n), or m + log l for n = 0.
// Same formula as torch.logaddexp, which cspkv.reference uses.
__device__ __forceinline__ float nsoftmax_log_denominator(float m, float l, bool use_n, float log_n) {
  const float lse = m + logf(l);
  if (!use_n) return lse;
  const float hi = fmaxf(lse, log_n), lo = fminf(lse, log_n);
  return hi + log1pf(expf(lo - hi));
}

// Largest inner index x over the rows r in [r0, r_end) of a group whose rows
// are laid out r = outer * inner_size + x (window rows: r = g * W + w; query
// rows: r = g * Q + i). Used to skip keys that no row of a tile may see.
__device__ __forceinline__ int max_inner_index(int r0, int r_end, int inner_size) {
  const int last = r_end - 1;
  return r0 / inner_size == last / inner_size ? last % inner_size : inner_size - 1;
}

// The same with inner_size given as a FastDivmod (no integer division).
__device__ __forceinline__ int max_inner_index(int r0, int r_end, const FastDivmod& inner) {
  const int last = r_end - 1;
  const int outer = inner.div(last);
  return inner.div(r0) == outer ? last - outer * inner.d : inner.d - 1;
}

// Exclusive prefix sum of one int per thread over a 1-D block, in thread
// order; *total receives the block-wide sum. Every thread of the block must
// call it (it synchronises); `scratch` (kWarp ints of shared memory) is free
// for reuse when it returns.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int value, int* scratch, int* total) {
  static_assert(kThreads % kWarp == 0 && kThreads <= kWarp * kWarp, "one warp must scan the warp totals");
  constexpr int kWarps = kThreads / kWarp;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    // Each lane reads and rewrites only its own slot: no race inside warp 0.
    int warp_total = lane < kWarps ? scratch[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int up = __shfl_up_sync(kFullMask, warp_total, offset);
      if (lane >= offset) warp_total += up;
    }
    if (lane < kWarps) scratch[lane] = warp_total;  // inclusive prefix over warps
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : scratch[warp - 1];
  *total = scratch[kWarps - 1];
  __syncthreads();  // scratch is read above before anyone may overwrite it
  return before + inclusive - value;
}

// Copies `rows` rows of `cols` elements into shared memory as float; row i
// lands at dst + i * dst_stride, and row_ptr(i) gives its source (nullptr: a
// row past the data, zero-filled). Columns [cols, padded_cols) are zeroed so
// that padded head-dim columns add nothing to dot products.
// vec16 (decided on the host): every row pointer is 16-byte aligned and
// cols * sizeof(scalar_t) is a multiple of 16, so rows are read with 16-byte
// loads; then cols is a multiple of 4 and padded_cols == cols.
template <int kThreads, typename scalar_t, typename RowPtr>
__device__ __forceinline__ void load_rows_to_shared(float* dst, int dst_stride, int rows, int cols,
                                                    int padded_cols, bool vec16, RowPtr row_ptr) {
  if (vec16) {
    constexpr int kPerVec = 16 / sizeof(scalar_t);
    const int vecs = cols / kPerVec;
    for (int e = threadIdx.x; e < rows * vecs; e += kThreads) {
      const int row = e / vecs, v = e % vecs;
      const scalar_t* src = row_ptr(row);
      float* out = dst + row * dst_stride + v * kPerVec;
      if (src == nullptr) {
#pragma unroll
        for (int t = 0; t < kPerVec; ++t) out[t] = 0.f;
        continue;
      }
      const uint4 raw = *reinterpret_cast<const uint4*>(src + v * kPerVec);
      scalar_t vals[kPerVec];
      memcpy(vals, &raw, sizeof(raw));
#pragma unroll
      for (int t = 0; t < kPerVec; ++t) out[t] = static_cast<float>(vals[t]);
    }
  } else {
    for (int e = threadIdx.x; e < rows * padded_cols; e += kThreads) {
      const int row = e / padded_cols, c = e % padded_cols;
      const scalar_t* src = row_ptr(row);
      dst[row * dst_stride + c] = (src != nullptr && c < cols) ? static_cast<float>(src[c]) : 0.f;
    }
  }
}

// Dot products of kRows consecutive query rows (from first_row) with one key,
// both staged in shared memory as float:
//   q_s: rows of padded_d floats (16-byte aligned, padded_d % 4 == 0), read as
//        float4; all lanes of a warp share first_row, so these are broadcasts;
//   k_s: key rows of stride padded_d + 1, an odd number of words, so the 32
//        lanes of a warp (32 different keys, same column) hit 32 different banks.
// Accumulates in the fixed order d = 0, 1, 2, ...: two kernels computing the
// same dot product get the same bits.
template <int kRows>
__device__ __forceinline__ void tile_dots(const float* q_s, const float* k_s, int padded_d, int first_row,
                                          int key, float (&dot)[kRows]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) dot[i] = 0.f;
  const float* k_row = k_s + key * (padded_d + 1);
  for (int d = 0; d < padded_d; d += 4) {
    const float k0 = k_row[d], k1 = k_row[d + 1], k2 = k_row[d + 2], k3 = k_row[d + 3];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const float4 q = *reinterpret_cast<const float4*>(q_s + (first_row + i) * padded_d + d);
      float acc = dot[i];
      acc = fmaf(q.x, k0, acc);
      acc = fmaf(q.y, k1, acc);
      acc = fmaf(q.z, k2, acc);
      acc = fmaf(q.w, k3, acc);
      dot[i] = acc;
    }
  }
}

}  // namespace cuda
}  // namespace cspkv
