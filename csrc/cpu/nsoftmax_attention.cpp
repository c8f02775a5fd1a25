// nsoftmax_attention on the CPU: Q new queries over a (pruned) KV cache, GQA
// without repeating K/V, plain softmax (n = 0) or the n-softmax denominator.
//
// Work unit: a tile of query rows of one KV head (its G query heads x Q queries,
// so each key row is read once for all of them) over one part of the cache.
// Keys are visited in blocks with an online softmax per row (running max m,
// sum l of exp(s - m), sum acc of exp(s - m) v). When B * Hkv is too small to
// keep every thread busy (decode on a small batch), the cache is split into
// parts whose (m, l, acc) are merged afterwards, flash-decoding style.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "dispatch.h"
#include "heuristics.h"

namespace cspkv {
namespace {

using cpu::kNegInf;

// Keys per block: the block's K and V rows stay in L1/L2 while every row of the
// tile uses them.
constexpr int64_t kBlockKeys = 64;
// Query rows per tile (decode has G of them, prefill chunks G * Q).
constexpr int64_t kTileRows = 64;

// Converts `rows` rows of half/bf16 K or V into a float32 block.
template <typename scalar_t>
CSPKV_CPU_CLONES void rows_to_float(const scalar_t* src,  // [rows, ld]
                                    int64_t ld, int64_t rows, int64_t cols,
                                    float* dst) {         // [rows, cols]
  for (int64_t j = 0; j < rows; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < cols; ++d) dst[j * cols + d] = static_cast<float>(src[j * ld + d]);
  }
}

// Folds one block of keys into the online softmax state of `rows` query rows.
// Keys a row may not see are never read from V, so dead slots holding garbage
// (even NaN) cannot leak into the output. The first row processed prefetches
// the next block's keys and values (`next_k`, `next_v`) four at a time.
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

// out = acc * exp(m - lse_n): the row's n-softmax average of V; zeros when
// the row saw no key.
template <typename scalar_t>
void write_row(float m, float l, const float* acc,  // [Dv]
               int64_t Dv, double n,
               scalar_t* out) {                     // [Dv]
  const float factor = m == kNegInf ? 0.0f : cpu::nsoftmax_factor(m, l, n);
  for (int64_t d = 0; d < Dv; ++d) out[d] = static_cast<scalar_t>(acc[d] * factor);
}

struct AttentionShape {
  int64_t B, H, Hkv, Q, Lc, D, Dv;
};

// Strides of a [B, Hkv, Lc, *] tensor whose last dim is contiguous.
struct CacheStrides {
  int64_t b, h, l;
};

template <typename scalar_t>
void nsoftmax_attention_kernel(const scalar_t* q,       // [B, H, Q, D] contiguous
                               const scalar_t* keys,    // [B, Hkv, Lc, D]
                               CacheStrides ks,
                               const scalar_t* values,  // [B, Hkv, Lc, Dv]
                               CacheStrides vs,
                               const bool* valid,       // [B, Hkv or 1, Lc] (last dim contiguous), or nullptr
                               CacheStrides vals,       // its strides (l unused)
                               int64_t valid_heads,     // Hkv or 1
                               const AttentionShape& shape, float scale, double n,
                               scalar_t* out) {         // [B, H, Q, Dv] contiguous
  const int64_t B = shape.B, H = shape.H, Hkv = shape.Hkv, Q = shape.Q, Lc = shape.Lc;
  const int64_t D = shape.D, Dv = shape.Dv, G = H / Hkv;
  constexpr bool kFloatCache = std::is_same_v<scalar_t, float>;

  // Row i of a KV head is query i / G of query head h * G + i % G: a tile holds
  // consecutive queries, so its causal limit cuts the keys it visits.
  const int64_t rows = G * Q;
  const int64_t tile_rows = std::min(rows, kTileRows);
  const int64_t tiles = cpu::ceil_div(rows, tile_rows);
  const int64_t items = B * Hkv * tiles;
  const int64_t parts = heuristics::cpu_attention_parts(items, Lc, at::get_num_threads());

  // Online-softmax state of every (item, part, row) when parts are merged later.
  std::vector<float> part_m(parts > 1 ? items * parts * tile_rows : 0);
  std::vector<float> part_l(part_m.size());
  std::vector<float> part_acc(part_m.size() * Dv);

  auto row_out = [&](int64_t b, int64_t h, int64_t i) {
    return out + ((b * H + h * G + i % G) * Q + i / G) * Dv;
  };

  at::parallel_for(0, items * parts, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> q_tile(tile_rows * D);
    std::vector<int64_t> limits(tile_rows), ends(tile_rows);
    std::vector<float> s(kBlockKeys);
    std::vector<int32_t> seen(kBlockKeys);
    std::vector<float> k_block(kFloatCache ? 0 : kBlockKeys * D);
    std::vector<float> v_block(kFloatCache ? 0 : kBlockKeys * Dv);
    std::vector<float> own_m(parts > 1 ? 0 : tile_rows), own_l(own_m.size()), own_acc(own_m.size() * Dv);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t item = task / parts, part = task % parts;
      const int64_t b = item / (Hkv * tiles), h = item / tiles % Hkv, tile = item % tiles;
      const int64_t row0 = tile * tile_rows;
      const int64_t n_rows = std::min(tile_rows, rows - row0);
      float* m = parts > 1 ? part_m.data() + task * tile_rows : own_m.data();
      float* l = parts > 1 ? part_l.data() + task * tile_rows : own_l.data();
      float* acc = parts > 1 ? part_acc.data() + task * tile_rows * Dv : own_acc.data();
      std::fill(m, m + n_rows, kNegInf);
      std::fill(l, l + n_rows, 0.0f);
      std::fill(acc, acc + n_rows * Dv, 0.0f);

      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t i = row0 + r;
        const scalar_t* q_row = q + ((b * H + h * G + i % G) * Q + i / G) * D;
        for (int64_t d = 0; d < D; ++d) q_tile[r * D + d] = static_cast<float>(q_row[d]);
        limits[r] = Lc - Q + i / G + 1;
      }
      const int64_t key_begin = part * Lc / parts;
      const int64_t key_end = std::min((part + 1) * Lc / parts, limits[n_rows - 1]);
      const scalar_t* head_keys = keys + b * ks.b + h * ks.h;
      const scalar_t* head_values = values + b * vs.b + h * vs.h;
      const bool* head_valid = valid == nullptr ? nullptr : valid + b * vals.b + h % valid_heads * vals.h;

      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockKeys) {
        const int64_t n_keys = std::min(kBlockKeys, key_end - j0);
        const float* k;
        const float* v;
        int64_t ldk, ldv;
        if constexpr (kFloatCache) {
          k = head_keys + j0 * ks.l, ldk = ks.l;
          v = head_values + j0 * vs.l, ldv = vs.l;
        } else {
          rows_to_float(head_keys + j0 * ks.l, ks.l, n_keys, D, k_block.data());
          rows_to_float(head_values + j0 * vs.l, vs.l, n_keys, Dv, v_block.data());
          k = k_block.data(), ldk = D;
          v = v_block.data(), ldv = Dv;
        }
        for (int64_t r = 0; r < n_rows; ++r) ends[r] = std::clamp<int64_t>(limits[r] - j0, 0, n_keys);
        const int64_t j1 = j0 + kBlockKeys, j2 = std::min(j1 + kBlockKeys, key_end);  // the next block
        const auto next_k = cpu::RowPrefetch::of(head_keys, ks.l, j1, j2, D);
        const auto next_v = cpu::RowPrefetch::of(head_values, vs.l, j1, j2, Dv);
        attend_block(q_tile.data(), ends.data(), n_rows, k, ldk, v, ldv,
                     head_valid == nullptr ? nullptr : head_valid + j0, D, Dv, scale, s.data(),
                     seen.data(), m, l, acc, next_k, next_v);
      }
      if (parts == 1) {
        for (int64_t r = 0; r < n_rows; ++r) write_row(m[r], l[r], acc + r * Dv, Dv, n, row_out(b, h, row0 + r));
      }
    }
  });

  if (parts == 1) return;
  at::parallel_for(0, items, 1, [&](int64_t item_begin, int64_t item_end) {
    std::vector<float> acc(Dv);
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t b = item / (Hkv * tiles), h = item / tiles % Hkv, tile = item % tiles;
      const int64_t row0 = tile * tile_rows;
      const int64_t n_rows = std::min(tile_rows, rows - row0);
      for (int64_t r = 0; r < n_rows; ++r) {
        auto at_part = [&](int64_t part) { return (item * parts + part) * tile_rows + r; };
        float m = kNegInf;
        for (int64_t part = 0; part < parts; ++part) m = std::max(m, part_m[at_part(part)]);
        float l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (m != kNegInf) {
          for (int64_t part = 0; part < parts; ++part) {
            const float m_part = part_m[at_part(part)];
            if (m_part == kNegInf) continue;  // this part saw no key of the row
            const float alpha = cpu::exp_nonpositive(m_part - m);
            l += alpha * part_l[at_part(part)];
            const float* acc_part = part_acc.data() + at_part(part) * Dv;
            for (int64_t d = 0; d < Dv; ++d) acc[d] += alpha * acc_part[d];
          }
        }
        write_row(m, l, acc.data(), Dv, n, row_out(b, h, row0 + r));
      }
    }
  });
}

at::Tensor nsoftmax_attention_cpu(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                  double scale, double n, const c10::optional<at::Tensor>& kv_valid) {
  check_nsoftmax_attention(q, keys, values, scale, n, kv_valid);
  const AttentionShape shape{q.size(0), q.size(1), keys.size(1), q.size(2),
                             keys.size(2), q.size(3), values.size(3)};
  const at::Tensor q_c = q.contiguous();  // Q rows: small next to the cache
  // The cache is read in place through its strides as long as rows are contiguous.
  const at::Tensor k = keys.stride(3) == 1 ? keys : keys.contiguous();
  const at::Tensor v = values.stride(3) == 1 ? values : values.contiguous();
  at::Tensor valid;
  if (kv_valid.has_value()) {
    valid = kv_valid->dim() == 2 ? kv_valid->unsqueeze(1) : *kv_valid;  // [B, Hkv or 1, Lc]
    if (valid.stride(2) != 1) valid = valid.contiguous();  // a pruned layer's view of its store is read in place
  }
  at::Tensor out = at::empty({shape.B, shape.H, shape.Q, shape.Dv}, q.options());
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nsoftmax_attention_cpu", [&] {
    nsoftmax_attention_kernel<scalar_t>(
        q_c.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), {k.stride(0), k.stride(1), k.stride(2)},
        v.data_ptr<scalar_t>(), {v.stride(0), v.stride(1), v.stride(2)},
        valid.defined() ? valid.data_ptr<bool>() : nullptr,
        valid.defined() ? CacheStrides{valid.stride(0), valid.stride(1), 1} : CacheStrides{0, 0, 1},
        valid.defined() ? valid.size(1) : 1, shape,
        static_cast<float>(scale), n, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CPU, m) { m.impl("nsoftmax_attention", &cspkv::nsoftmax_attention_cpu); }
