// Helpers shared by the CPU kernels: per-CPU code paths for the hot loops, an
// exp that vectorises, the n-softmax normaliser, row prefetches. How work is
// split into parts is in heuristics.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// The extension is built with baseline x86-64 flags (it must run on any CPU the
// wheel lands on), which would leave every loop at SSE2 width. Hot loops are
// therefore compiled three times and the loader picks the widest the CPU has
// (GCC/Clang function multi-versioning, resolved once through an ifunc).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CSPKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CSPKV_CPU_CLONES
#endif

namespace cspkv::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// 8 floats, one AVX register: the clones use ymm registers (full FMA rate on
// AVX2 and AVX-512 parts alike), the baseline clone pairs of SSE registers.
// vec8_at reads and writes 8 floats at any 4-byte aligned address (GCC vector
// types may alias their element type).
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_at __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16)));

// exp(x) for x <= 0 (or NaN) in plain arithmetic, so that loops calling it
// vectorise: std::exp does not without -ffast-math. Cephes' expf: x = k ln2 + r
// with |r| <= ln2 / 2, a degree-6 polynomial for exp(r), 2^k from the exponent
// bits; within 1 ulp of exp. Below -87.34, where expf goes subnormal, it
// returns 0, so masked entries (-inf) drop out without a branch.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.33654f;
  x = underflow ? -87.33654f : x;
  // Adding 1.5 * 2^23 rounds x / ln2 to an integer k held in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float k = shifted - 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const int32_t pow2_bits = (bits - 0x4B400000 + 127) << 23;  // k in [-126, 0]: a normal 2^k
  float pow2;
  std::memcpy(&pow2, &pow2_bits, sizeof(pow2));
  // ln2 split in two so that k * ln2_hi is exact.
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  return underflow ? 0.0f : y * pow2;
}

// exp(m - lse_n) for a row whose allowed logits have maximum m and
// sum_j exp(s_j - m) = sum: multiplying exp(s_j - m) by it gives the n-softmax
// probability exp(s_j - lse_n), lse_n = logaddexp(logsumexp(s), log n)
// (logsumexp(s) for n = 0). Double precision: it is once per row, and
// n * exp(-m) alone would overflow for very negative m.
inline float nsoftmax_factor(float m, float sum, double n) {
  const double lse = double(m) + std::log(double(sum));
  double lse_n = lse;
  if (n > 0) {
    const double log_n = std::log(n);
    lse_n = std::max(lse, log_n) + std::log1p(std::exp(-std::abs(lse - log_n)));
  }
  return float(std::exp(double(m) - lse_n));
}

// out[i] = q . k_i over D for four keys. Four vector sums reduced together by
// shuffles: reducing each one on its own, as compilers do for an `omp simd`
// reduction, costs more than the products themselves at D = 64.
inline void dot4(const float* q,  // [D]
                 const float* k0, const float* k1, const float* k2, const float* k3,  // [D] each
                 int64_t D, float* out) {                                            // [4]
  vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const vec8 x = *reinterpret_cast<const vec8_at*>(q + d);
    a0 += x * *reinterpret_cast<const vec8_at*>(k0 + d);
    a1 += x * *reinterpret_cast<const vec8_at*>(k1 + d);
    a2 += x * *reinterpret_cast<const vec8_at*>(k2 + d);
    a3 += x * *reinterpret_cast<const vec8_at*>(k3 + d);
  }
  // Lanes: [a0 01, a1 01, a0 23, a1 23, a0 45, a1 45, a0 67, a1 67] (sums of lane pairs).
  const vec8 p01 = __builtin_shufflevector(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
  const vec8 p23 = __builtin_shufflevector(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) +
                   __builtin_shufflevector(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
  // Lanes: [a0 0-3, a1 0-3, a2 0-3, a3 0-3, a0 4-7, a1 4-7, a2 4-7, a3 4-7].
  const vec8 quads = __builtin_shufflevector(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13) +
                     __builtin_shufflevector(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);
  vec4 sums = __builtin_shufflevector(quads, quads, 0, 1, 2, 3) + __builtin_shufflevector(quads, quads, 4, 5, 6, 7);
  for (; d < D; ++d) {  // head dims that are not a multiple of 8
    sums[0] += q[d] * k0[d];
    sums[1] += q[d] * k1[d];
    sums[2] += q[d] * k2[d];
    sums[3] += q[d] * k3[d];
  }
  std::memcpy(out, &sums, sizeof(sums));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a row-major array (a head's keys or values) to bring into the cache
// while a kernel works on earlier ones: issued a few rows at a time between
// pieces of arithmetic, the loads from memory overlap it instead of stalling
// the next block's first touches. Empty (rows = 0) by default.
struct RowPrefetch {
  const char* first = nullptr;  // the first row's first byte
  int64_t stride = 0;           // bytes from one row to the next
  int64_t rows = 0;
  int64_t bytes = 0;            // bytes per row

  // Rows [begin, end) of `base` [*, ld], `cols` elements of each; empty when begin >= end.
  template <typename T>
  static RowPrefetch of(const T* base, int64_t ld, int64_t begin, int64_t end, int64_t cols) {
    if (begin >= end) return {};
    return {reinterpret_cast<const char*>(base + begin * ld), ld * int64_t(sizeof(T)), end - begin,
            cols * int64_t(sizeof(T))};
  }

  // Every 64-byte line of rows [begin, end), clipped to the rows there are.
  void fetch(int64_t begin, int64_t end) const {
    for (int64_t r = begin; r < std::min(end, rows); ++r) {
      for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + r * stride + offset);
    }
  }
};

}  // namespace cspkv::cpu
