// packed_attention on the CPU: T new queries over a packed cache, one segment
// of key/value rows per (batch row, KV head), each of its own length. GQA
// without repeating K/V, plain softmax (n = 0) or the n-softmax denominator.
//
// Work unit: a tile of query rows of one segment (its KV head's G query heads
// x T queries, so each key row is read once for all of them); keys are folded
// block by block into an online softmax (cpu/attention_block.h, the blocks of
// nsoftmax_attention). Segments are whole tasks of at::parallel_for: a decode
// step of a batch has B * Hkv of them, enough for the threads a CPU has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/attention_block.h"
#include "cpu/common.h"
#include "dispatch.h"

namespace cspkv {
namespace {

using cpu::kBlockKeys;
using cpu::kNegInf;
using cpu::kTileRows;

struct PackedShape {
  int64_t B, H, Hkv, T, D, Dv;
};

template <typename scalar_t>
void packed_attention_kernel(const scalar_t* q,           // [B, H, T, D] contiguous
                             const scalar_t* key_data,    // [N, D], rows ldk apart
                             int64_t ldk,
                             const scalar_t* value_data,  // [N, Dv], rows ldv apart
                             int64_t ldv,
                             const int64_t* offsets,      // [B * Hkv]
                             const int64_t* lengths,      // [B * Hkv]
                             const PackedShape& shape, float scale, double n,
                             scalar_t* out) {             // [B, H, T, Dv] contiguous
  const int64_t H = shape.H, Hkv = shape.Hkv, T = shape.T, D = shape.D, Dv = shape.Dv, G = H / Hkv;
  constexpr bool kFloatCache = std::is_same_v<scalar_t, float>;
  // Row i of a segment is query i / G of query head h * G + i % G.
  const int64_t rows = G * T;
  const int64_t tile_rows = std::min(rows, kTileRows);
  const int64_t tiles = cpu::ceil_div(rows, tile_rows);
  const int64_t items = shape.B * Hkv * tiles;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    cpu::BlockScratch scratch(tile_rows, D, Dv, kFloatCache);
    auto& [q_tile, limits, ends, s, seen, k_block, v_block] = scratch;
    std::vector<float> m(tile_rows), l(tile_rows), acc(tile_rows * Dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t segment = item / tiles, tile = item % tiles;
      const int64_t b = segment / Hkv, h = segment % Hkv;
      const int64_t length = lengths[segment];
      const int64_t row0 = tile * tile_rows;
      const int64_t n_rows = std::min(tile_rows, rows - row0);
      std::fill(m.begin(), m.begin() + n_rows, kNegInf);
      std::fill(l.begin(), l.begin() + n_rows, 0.0f);
      std::fill(acc.begin(), acc.begin() + n_rows * Dv, 0.0f);
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t i = row0 + r;
        const scalar_t* q_row = q + ((b * H + h * G + i % G) * T + i / G) * D;
        for (int64_t d = 0; d < D; ++d) q_tile[r * D + d] = static_cast<float>(q_row[d]);
        limits[r] = length - T + i / G + 1;  // the chunk's own tokens are the segment's last T slots
      }
      const int64_t key_end = std::min(length, limits[n_rows - 1]);
      const scalar_t* seg_keys = key_data + offsets[segment] * ldk;
      const scalar_t* seg_values = value_data + offsets[segment] * ldv;
      for (int64_t j0 = 0; j0 < key_end; j0 += kBlockKeys) {
        const int64_t n_keys = std::min(kBlockKeys, key_end - j0);
        const float* k;
        const float* v;
        int64_t ldk_f, ldv_f;
        if constexpr (kFloatCache) {
          k = seg_keys + j0 * ldk, ldk_f = ldk;
          v = seg_values + j0 * ldv, ldv_f = ldv;
        } else {
          cpu::rows_to_float(seg_keys + j0 * ldk, ldk, n_keys, D, k_block.data());
          cpu::rows_to_float(seg_values + j0 * ldv, ldv, n_keys, Dv, v_block.data());
          k = k_block.data(), ldk_f = D;
          v = v_block.data(), ldv_f = Dv;
        }
        for (int64_t r = 0; r < n_rows; ++r) ends[r] = std::clamp<int64_t>(limits[r] - j0, 0, n_keys);
        const int64_t j1 = j0 + kBlockKeys, j2 = std::min(j1 + kBlockKeys, key_end);  // the next block
        const auto next_k = cpu::RowPrefetch::of(seg_keys, ldk, j1, j2, D);
        const auto next_v = cpu::RowPrefetch::of(seg_values, ldv, j1, j2, Dv);
        cpu::attend_block(q_tile.data(), ends.data(), n_rows, k, ldk_f, v, ldv_f, nullptr, D, Dv, scale, s.data(),
                          seen.data(), m.data(), l.data(), acc.data(), next_k, next_v);
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t i = row0 + r;
        cpu::write_row(m[r], l[r], acc.data() + r * Dv, Dv, n, out + ((b * H + h * G + i % G) * T + i / G) * Dv);
      }
    }
  });
}

at::Tensor packed_attention_cpu(const at::Tensor& q, const at::Tensor& key_data, const at::Tensor& value_data,
                                const at::Tensor& offsets, const at::Tensor& lengths, double scale, double n) {
  check_packed_attention(q, key_data, value_data, offsets, lengths, scale, n);
  check_packed_segments_cpu(offsets, lengths, key_data.size(0));
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const PackedShape shape{B, H, offsets.size(0) / B, T, q.size(3), value_data.size(1)};
  const at::Tensor q_c = q.contiguous();
  // The store is read in place through its row stride as long as rows are contiguous.
  const at::Tensor k = key_data.stride(1) == 1 ? key_data : key_data.contiguous();
  const at::Tensor v = value_data.stride(1) == 1 ? value_data : value_data.contiguous();
  const at::Tensor off = offsets.contiguous(), len = lengths.contiguous();
  at::Tensor out = at::empty({B, H, T, shape.Dv}, q.options());
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "packed_attention_cpu", [&] {
    packed_attention_kernel<scalar_t>(q_c.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), k.stride(0),
                                      v.data_ptr<scalar_t>(), v.stride(0), off.data_ptr<int64_t>(),
                                      len.data_ptr<int64_t>(), shape, static_cast<float>(scale), n,
                                      out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CPU, m) { m.impl("packed_attention", &cspkv::packed_attention_cpu); }
