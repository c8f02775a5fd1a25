// The CPU attention kernels' block step, compiled once: its per-CPU clones
// (CSPKV_CPU_CLONES) sit behind one symbol for every kernel file that calls it.
#include "cpu/attention_block.h"

namespace cspkv::cpu {

CSPKV_CPU_CLONES
void attend_block(const float* q,         // [rows, D]
                  const int64_t* ends,    // [rows] row r sees block keys j < ends[r]
                  int64_t rows,
                  const float* k,         // [keys, ldk]
                  int64_t ldk,
                  const float* v,         // [keys, ldv]
                  int64_t ldv,
                  const bool* valid,      // [keys], or nullptr: all valid
                  int64_t D, int64_t Dv, float scale,
                  float* s,               // [kBlockKeys] scratch
                  int32_t* seen,          // [kBlockKeys] scratch
                  float* m,               // [rows] running max
                  float* l,               // [rows] running sum of exp(s - m)
                  float* acc,             // [rows, Dv] running sum of exp(s - m) v
                  const cpu::RowPrefetch& next_k, const cpu::RowPrefetch& next_v) {
  // The valid keys of the block, ascending; a row sees a prefix of them.
  int64_t n_seen = 0;
  for (int64_t j = 0; j < ends[rows - 1]; ++j) {
    if (valid == nullptr || valid[j]) seen[n_seen++] = static_cast<int32_t>(j);
  }
  int64_t count = n_seen;
  for (int64_t r = rows - 1; r >= 0; --r) {  // ends[] ascend with r, so counts shrink as r falls
    while (count > 0 && seen[count - 1] >= ends[r]) --count;
    if (count == 0) break;
    const float* q_row = q + r * D;
    const bool first_row = r == rows - 1;

    // Dot products four keys at a time; a last partial group repeats its final
    // key and drops the extra results.
    for (int64_t c = 0; c < count; c += 4) {
      if (first_row) next_k.fetch(c, c + 4);
      const int64_t last = std::min<int64_t>(count - 1, c + 3);
      float dots[4];
      cpu::dot4(q_row, k + seen[c] * ldk, k + seen[std::min(c + 1, last)] * ldk,
                k + seen[std::min(c + 2, last)] * ldk, k + seen[last] * ldk, D, dots);
      for (int64_t i = c; i <= last; ++i) s[i] = dots[i - c] * scale;
    }
    float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < count; ++i) block_max = s[i] > block_max ? s[i] : block_max;

    float* a = acc + r * Dv;
    const float m_new = block_max > m[r] ? block_max : m[r];
    if (m_new != m[r]) {  // rescale what earlier blocks summed to the new max
      const float alpha = cpu::exp_nonpositive(m[r] - m_new);  // 0 while m[r] is -inf
      l[r] *= alpha;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] *= alpha;
      m[r] = m_new;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < count; ++i) {
      const float e = cpu::exp_nonpositive(s[i] - m_new);
      s[i] = e;
      sum += e;
    }
    l[r] += sum;

    // Four keys per sweep over acc: one load and store of acc per four FMAs.
    int64_t c = 0;
    for (; c + 4 <= count; c += 4) {
      if (first_row) next_v.fetch(c, c + 4);
      const float e0 = s[c], e1 = s[c + 1], e2 = s[c + 2], e3 = s[c + 3];
      const float* v0 = v + seen[c] * ldv;
      const float* v1 = v + seen[c + 1] * ldv;
      const float* v2 = v + seen[c + 2] * ldv;
      const float* v3 = v + seen[c + 3] * ldv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += e0 * v0[d] + e1 * v1[d] + e2 * v2[d] + e3 * v3[d];
    }
    for (; c < count; ++c) {
      const float e = s[c];
      const float* v_row = v + seen[c] * ldv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += e * v_row[d];
    }
  }
}

}  // namespace cspkv::cpu
