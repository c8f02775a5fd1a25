// window_scores on the CPU: the self- and cross-modality n-softmax mass each key
// receives from the observation window, without a W x L probability matrix.
//
// Work unit: a tile of query rows (window query w x query head g of one KV head)
// against all keys it may see. A register-blocked micro-kernel fills the tile's
// logits from packed keys (packed once per task, or panel by panel as reached
// when the task is a single tile: then every key is read from memory once,
// prefetched ahead of use); each row is then normalised with a
// single exp per entry (max, then exp(s - max) kept in place, then the row
// factor of cspkv::cpu::nsoftmax_factor) and added to the key scores. With
// given log-sum-exps (`lse`) the max and sum are not needed: one pass of
// exp(s - log denominator) per row.
// Scratch per task: one logits tile (<= 1 MiB when streamed, else <= 256 KiB
// unless L > 8192), one panel or one KV head of packed float32 keys, and 2 x L
// partial scores when a KV head is split between
// threads. No ATen call runs inside the parallel region: at::mm there would
// open a nested OpenMP region per tile, which costs dearly on a busy machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "dispatch.h"
#include "heuristics.h"
#include "window_lse.h"

namespace cspkv {
namespace {

using cpu::kNegInf;
using cpu::vec8;
using cpu::vec8_at;

// How far ahead of the panel being multiplied its keys are prefetched.
constexpr int64_t kPrefetchPanels = 4;
// Keys per packed panel and query rows per micro-kernel call (see tile_logits).
constexpr int64_t kPanelKeys = 16;
constexpr int64_t kRowBlock = 4;

// v = x[0..7] as floats.
template <typename scalar_t>
inline void load_vec8(const scalar_t* x, vec8& v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v = *reinterpret_cast<const vec8_at*>(x);
  } else {
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(x[i]);
  }
}

// In place: afterwards v[i][j] holds what v[j][i] held. Three rounds of two-input
// shuffles (pairs of floats, pairs of pairs, 128-bit halves), 24 in all.
inline void transpose_8x8(vec8 (&v)[8]) {
  vec8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(v[i], v[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(v[i], v[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] = __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    v[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Packs keys [n_keys, D] into panels of kPanelKeys keys stored d-major,
// [n_panels, D, kPanelKeys], so that the micro-kernel reads the d-th component
// of a panel's keys with two vector loads; missing keys of the last panel are 0.
// Full panels of a head dim that is a multiple of 8 go through 8 x 8 transposes
// in registers (scalar strided stores cost as much as the products at W = 32).
template <typename scalar_t>
CSPKV_CPU_CLONES void pack_key_panels(const scalar_t* keys,  // [n_keys, ld]
                                      int64_t ld, int64_t n_keys, int64_t D,
                                      float* panels) {       // [ceil(n_keys / 16), D, 16]
  const int64_t n_panels = cpu::ceil_div(n_keys, kPanelKeys);
  for (int64_t p = 0; p < n_panels; ++p) {
    float* panel = panels + p * D * kPanelKeys;
    const scalar_t* panel_keys = keys + p * kPanelKeys * ld;
    if (n_keys - p * kPanelKeys >= kPanelKeys && D % 8 == 0) {
      for (int64_t d = 0; d < D; d += 8) {
        for (int64_t half = 0; half < kPanelKeys; half += 8) {
          vec8 v[8];
          for (int i = 0; i < 8; ++i) load_vec8(panel_keys + (half + i) * ld + d, v[i]);
          transpose_8x8(v);
          for (int i = 0; i < 8; ++i) *reinterpret_cast<vec8_at*>(panel + (d + i) * kPanelKeys + half) = v[i];
        }
      }
      continue;
    }
    for (int64_t jj = 0; jj < kPanelKeys; ++jj) {
      const int64_t j = p * kPanelKeys + jj;
      if (j < n_keys) {
        const scalar_t* key = keys + j * ld;
        for (int64_t d = 0; d < D; ++d) panel[d * kPanelKeys + jj] = static_cast<float>(key[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) panel[d * kPanelKeys + jj] = 0.0f;
      }
    }
  }
}

// logits[r, j] = q[r] . k[j] for `rows` rows (a multiple of kRowBlock) and the
// keys of `n_panels` panels. A 4 x 16 block keeps 8 independent vector sums in
// registers: enough to cover the FMA latency, few enough to leave registers for
// the two key loads and the query broadcasts. The rows of `prefetch` (keys
// needed later) are prefetched a few at a time between row blocks.
CSPKV_CPU_CLONES
void tile_logits(const float* q,       // [rows, D]
                 int64_t rows, int64_t D,
                 const float* panels,  // [n_panels, D, 16]
                 int64_t n_panels,
                 float* logits,        // [rows, ld], ld >= 16 * n_panels
                 int64_t ld, const cpu::RowPrefetch& prefetch = {}) {
  const int64_t keys_per_block = cpu::ceil_div(prefetch.rows * kRowBlock, rows);
  for (int64_t p = 0; p < n_panels; ++p) {
    const float* panel = panels + p * D * kPanelKeys;
    for (int64_t r = 0; r < rows; r += kRowBlock) {
      prefetch.fetch(r / kRowBlock * keys_per_block, (r / kRowBlock + 1) * keys_per_block);
      const float* q0 = q + r * D;
      const float* q1 = q0 + D;
      const float* q2 = q1 + D;
      const float* q3 = q2 + D;
      vec8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      for (int64_t d = 0; d < D; ++d) {
        const vec8 k0 = *reinterpret_cast<const vec8_at*>(panel + d * kPanelKeys);
        const vec8 k1 = *reinterpret_cast<const vec8_at*>(panel + d * kPanelKeys + 8);
        c00 += q0[d] * k0, c01 += q0[d] * k1;
        c10 += q1[d] * k0, c11 += q1[d] * k1;
        c20 += q2[d] * k0, c21 += q2[d] * k1;
        c30 += q3[d] * k0, c31 += q3[d] * k1;
      }
      vec8_at* out = reinterpret_cast<vec8_at*>(logits + r * ld + p * kPanelKeys);
      const int64_t row = ld / 8;  // ld is a multiple of 16
      out[0] = c00, out[1] = c01;
      out[row] = c10, out[row + 1] = c11;
      out[2 * row] = c20, out[2 * row + 1] = c21;
      out[3 * row] = c30, out[3 * row + 1] = c31;
    }
  }
}

// Adds the n-softmax probabilities of `rows` query rows to the scores of the
// keys they see, split by whether query and key share a modality. Without
// `log_den` each row is normalised by its own max and sum; with it (given
// log-sum-exps, see window_lse.h) a probability is one exp.
CSPKV_CPU_CLONES
void accumulate_window_rows(float* logits,          // [rows, ld] q . k in, overwritten
                            int64_t ld, int64_t rows,
                            const int64_t* ends,    // [rows] row r sees keys j < ends[r]
                            const int32_t* q_mods,  // [rows] modality of row r's query, >= 0
                            const float* log_den,   // [rows] log n-softmax denominators, or nullptr
                            const int32_t* k_mod,   // [L] key modalities, -1 = padding
                            float scale, double n,
                            float* self_scores,     // [L] accumulated into
                            float* cross_scores) {  // [L] accumulated into
  for (int64_t r = 0; r < rows; ++r) {
    float* s = logits + r * ld;
    const int64_t end = ends[r];
    const int32_t q_mod = q_mods[r];
    float factor = 1.0f;  // s[j] * factor is the probability once s holds exps
    if (log_den != nullptr) {
      const float den = log_den[r];
      if (den == cpu::kPosInf) continue;  // no key to attend to (lse = -inf)
#pragma omp simd
      for (int64_t j = 0; j < end; ++j) {
        // min: a given log-sum-exp may sit a rounding error below the row's largest logit.
        const float e = cpu::exp_nonpositive(std::min(s[j] * scale - den, 0.0f));
        s[j] = k_mod[j] >= 0 ? e : 0.0f;
      }
    } else {
      float m = kNegInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < end; ++j) {
        const float x = k_mod[j] >= 0 ? s[j] * scale : kNegInf;
        s[j] = x;
        m = x > m ? x : m;
      }
      if (m == kNegInf) continue;  // no key to attend to: the row has no probability mass
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < end; ++j) {
        const float e = cpu::exp_nonpositive(s[j] - m);
        s[j] = e;
        sum += e;
      }
      factor = cpu::nsoftmax_factor(m, sum, n);
    }
#pragma omp simd
    for (int64_t j = 0; j < end; ++j) {
      const float p = s[j] * factor;
      const bool same = k_mod[j] == q_mod;
      self_scores[j] += same ? p : 0.0f;
      cross_scores[j] += same ? 0.0f : p;
    }
  }
}

// Strides of the keys [B, Hkv, L, D] along B, Hkv and L (D is contiguous).
struct KeyStrides {
  int64_t b, h, l;
};

template <typename scalar_t>
void window_scores_kernel(const scalar_t* q_win,  // [B, H, W, D] contiguous
                          const scalar_t* keys,   // [B, Hkv, L, D]
                          KeyStrides ks,
                          const int32_t* q_mod,   // [B, W]
                          const int32_t* k_mod,   // [B, L]
                          const float* log_den,   // [B, H, W] contiguous (window_lse.h), or nullptr
                          const WindowScoresShape& shape, float scale, double n,
                          float* self_out,        // [B, Hkv, L] zero-filled
                          float* cross_out) {     // [B, Hkv, L] zero-filled
  const int64_t B = shape.B, H = shape.H, Hkv = shape.Hkv, W = shape.W, L = shape.L, D = shape.D;
  const int64_t G = H / Hkv;
  const int64_t max_panels = cpu::ceil_div(L, kPanelKeys);

  // Padding queries contribute nothing: only the real ones become rows.
  std::vector<std::vector<int64_t>> window(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t w = 0; w < W; ++w) {
      if (q_mod[b * W + w] >= 0) window[b].push_back(w);
    }
  }

  // A KV head's rows may be split into parts; parts write partial scores that
  // are summed in a fixed order afterwards (deterministic, no atomics).
  const int64_t heads = B * Hkv;
  const int64_t parts = heuristics::cpu_window_parts(heads, G * W, at::get_num_threads());
  std::vector<float> partial(parts > 1 ? heads * parts * 2 * L : 0, 0.0f);

  // Few rows per part (small windows, few query heads per KV head): the part is
  // one tile and its keys stream through one packed panel, each read from memory
  // once (prefetched while earlier panels are multiplied). Otherwise every tile
  // reuses the part's keys, packed once up front, and tiles are sized to stay in
  // L2 with the packed keys.
  const int64_t part_rows = cpu::ceil_div(cpu::ceil_div(G * W, parts), kRowBlock) * kRowBlock;
  const bool stream = heuristics::cpu_window_streams_keys(part_rows, max_panels * kPanelKeys);
  const int64_t tile_rows = stream ? part_rows : heuristics::cpu_window_tile_rows(L, kRowBlock);

  at::parallel_for(0, heads * parts, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> panels((stream ? 1 : max_panels) * kPanelKeys * D);
    std::vector<float> q_tile(tile_rows * D);
    std::vector<float> logits(tile_rows * max_panels * kPanelKeys);
    std::vector<int64_t> ends(tile_rows);
    std::vector<int32_t> q_mods(tile_rows);
    std::vector<float> row_log_den(log_den != nullptr ? tile_rows : 0);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t head = task / parts, part = task % parts;
      const int64_t b = head / Hkv, h = head % Hkv;
      const std::vector<int64_t>& rows_w = window[b];
      const int64_t rows = G * static_cast<int64_t>(rows_w.size());
      const int64_t row_begin = part * rows / parts, row_end = (part + 1) * rows / parts;
      if (row_begin == row_end) continue;
      float* self_dst = parts > 1 ? partial.data() + task * 2 * L : self_out + head * L;
      float* cross_dst = parts > 1 ? self_dst + L : cross_out + head * L;

      // Row i of a head is window query rows_w[i / G] of query head h * G + i % G,
      // so a tile covers consecutive window positions and stops at the last key
      // its latest query sees.
      const int64_t part_keys = L - W + rows_w[(row_end - 1) / G] + 1;
      const scalar_t* head_keys = keys + b * ks.b + h * ks.h;
      if (!stream) pack_key_panels(head_keys, ks.l, part_keys, D, panels.data());
      for (int64_t tile_begin = row_begin; tile_begin < row_end; tile_begin += tile_rows) {
        const int64_t n_rows = std::min(tile_rows, row_end - tile_begin);
        const int64_t padded_rows = cpu::ceil_div(n_rows, kRowBlock) * kRowBlock;
        for (int64_t r = 0; r < n_rows; ++r) {
          const int64_t i = tile_begin + r;
          const int64_t w = rows_w[i / G], g = i % G;
          const scalar_t* q_row = q_win + ((b * H + h * G + g) * W + w) * D;
          for (int64_t d = 0; d < D; ++d) q_tile[r * D + d] = static_cast<float>(q_row[d]);
          ends[r] = L - W + w + 1;
          q_mods[r] = q_mod[b * W + w];
          if (log_den != nullptr) row_log_den[r] = log_den[(b * H + h * G + g) * W + w];
        }
        std::fill(q_tile.begin() + n_rows * D, q_tile.begin() + padded_rows * D, 0.0f);
        const int64_t n_panels = cpu::ceil_div(ends[n_rows - 1], kPanelKeys);
        const int64_t ld = n_panels * kPanelKeys;
        if (!stream) {
          tile_logits(q_tile.data(), padded_rows, D, panels.data(), n_panels, logits.data(), ld);
        } else {
          for (int64_t p = 0; p < n_panels; ++p) {
            const int64_t first = p * kPanelKeys, ahead = first + kPrefetchPanels * kPanelKeys;
            const auto next = cpu::RowPrefetch::of(head_keys, ks.l, ahead, std::min(ahead + kPanelKeys, part_keys), D);
            pack_key_panels(head_keys + first * ks.l, ks.l, std::min(kPanelKeys, part_keys - first), D, panels.data());
            tile_logits(q_tile.data(), padded_rows, D, panels.data(), 1, logits.data() + first, ld, next);
          }
        }
        accumulate_window_rows(logits.data(), ld, n_rows, ends.data(), q_mods.data(),
                               log_den != nullptr ? row_log_den.data() : nullptr, k_mod + b * L, scale, n,
                               self_dst, cross_dst);
      }
    }
  });

  if (parts == 1) return;
  at::parallel_for(0, heads, 1, [&](int64_t head_begin, int64_t head_end) {
    for (int64_t head = head_begin; head < head_end; ++head) {
      for (int64_t part = 0; part < parts; ++part) {
        const float* self_part = partial.data() + (head * parts + part) * 2 * L;
        const float* cross_part = self_part + L;
        float* self_dst = self_out + head * L;
        float* cross_dst = cross_out + head * L;
#pragma omp simd
        for (int64_t j = 0; j < L; ++j) {
          self_dst[j] += self_part[j];
          cross_dst[j] += cross_part[j];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_scores_cpu(const at::Tensor& q_win, const at::Tensor& keys,
                                                     const at::Tensor& q_mod, const at::Tensor& k_mod,
                                                     double scale, double n, const c10::optional<at::Tensor>& lse) {
  const WindowScoresShape shape = check_window_scores(q_win, keys, q_mod, k_mod, scale, n, lse);
  const at::Tensor q = q_win.contiguous();  // W x H x D: small next to the keys
  const at::Tensor k = keys.stride(3) == 1 ? keys : keys.contiguous();
  const at::Tensor q_ids = q_mod.to(at::kInt).contiguous();
  const at::Tensor k_ids = k_mod.to(at::kInt).contiguous();
  const auto f32 = keys.options().dtype(at::kFloat);
  at::Tensor self_scores = at::zeros({shape.B, shape.Hkv, shape.L}, f32);
  at::Tensor cross_scores = at::zeros({shape.B, shape.Hkv, shape.L}, f32);
  const at::Tensor log_den = lse.has_value() ? window_log_denominator(*lse, n) : at::Tensor();
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_scores_cpu", [&] {
    window_scores_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   {k.stride(0), k.stride(1), k.stride(2)}, q_ids.data_ptr<int32_t>(),
                                   k_ids.data_ptr<int32_t>(), log_den.defined() ? log_den.data_ptr<float>() : nullptr,
                                   shape, static_cast<float>(scale), n,
                                   self_scores.data_ptr<float>(), cross_scores.data_ptr<float>());
  });
  return {self_scores, cross_scores};
}

}  // namespace
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CPU, m) { m.impl("window_scores", &cspkv::window_scores_cpu); }
