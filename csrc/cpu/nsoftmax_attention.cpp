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
#include "cpu/attention_block.h"
#include "cpu/common.h"
#include "dispatch.h"
#include "heuristics.h"

namespace cspkv {
namespace {

using cpu::kNegInf;
using cpu::kBlockKeys;
using cpu::kTileRows;
using cpu::attend_block;
using cpu::rows_to_float;
using cpu::write_row;

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
    cpu::BlockScratch scratch(tile_rows, D, Dv, kFloatCache);
    auto& [q_tile, limits, ends, s, seen, k_block, v_block] = scratch;
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
