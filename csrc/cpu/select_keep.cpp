// select_keep on the CPU: which keys survive pruning, per batch row and KV head.
// Bit-exact with cspkv.reference.select_keep: recent window, then the best
// cross scores, then the best self scores among what is left, output ascending.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"

namespace cspkv {
namespace {

struct Ranked {
  float score;
  int64_t index;
};

// The strict order of cspkv.reference.select_keep (and the CUDA kernel):
// higher score first, NaN below every number, the lower index first on ties.
// -0.0 == +0.0 compares equal, so the two tie.
bool ranks_before(const Ranked& a, const Ranked& b) {
  const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

// Marks the `count` best unpicked candidates by `scores` as picked.
void pick_best(const float* scores,          // [L]
               const std::vector<int64_t>& candidates, int64_t count,
               std::vector<uint8_t>& picked,  // [L]
               std::vector<Ranked>& ranked) {
  if (count == 0) return;
  ranked.clear();
  for (const int64_t j : candidates) {
    if (!picked[j]) ranked.push_back({scores[j], j});
  }
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(ranked.size()) >= count,
                        "select_keep: fewer candidates than slots to fill");
  // Only the set of the best `count` matters: the output is sorted by index.
  std::nth_element(ranked.begin(), ranked.begin() + (count - 1), ranked.end(), ranks_before);
  for (int64_t c = 0; c < count; ++c) picked[ranked[c].index] = 1;
}

std::tuple<at::Tensor, at::Tensor> select_keep_cpu(const at::Tensor& self_scores, const at::Tensor& cross_scores,
                                                   const at::Tensor& k_mod, int64_t budget, int64_t recent,
                                                   double cross_ratio) {
  check_select_keep(self_scores, cross_scores, k_mod, budget, recent, cross_ratio);
  const int64_t B = self_scores.size(0), Hkv = self_scores.size(1), L = self_scores.size(2);
  const at::Tensor self_c = self_scores.contiguous();
  const at::Tensor cross_c = cross_scores.contiguous();
  const at::Tensor ids = k_mod.to(at::kInt).contiguous();
  const float* self_p = self_c.data_ptr<float>();
  const float* cross_p = cross_c.data_ptr<float>();
  const int32_t* mod = ids.data_ptr<int32_t>();

  // The same double arithmetic as the reference's int(math.floor(cross_ratio * heavy)).
  const int64_t heavy = budget - recent;
  const int64_t k_cross = static_cast<int64_t>(std::floor(cross_ratio * static_cast<double>(heavy)));
  const int64_t k_self = heavy - k_cross;

  at::Tensor keep_idx = at::empty({B, Hkv, budget}, self_scores.options().dtype(at::kLong));
  at::Tensor keep_valid = at::empty({B, Hkv, budget}, self_scores.options().dtype(at::kBool));
  int64_t* idx_out = keep_idx.data_ptr<int64_t>();
  bool* valid_out = keep_valid.data_ptr<bool>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<uint8_t> picked(L);
    std::vector<int64_t> candidates;
    std::vector<Ranked> ranked;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int32_t* row_mod = mod + row / Hkv * L;
      int64_t* idx = idx_out + row * budget;
      bool* valid = valid_out + row * budget;
      const int64_t n_real = std::count_if(row_mod, row_mod + L, [](int32_t m) { return m >= 0; });

      if (n_real <= budget) {  // keep every real token, pad with the first padding slots
        int64_t kept = 0, padding_left = budget - n_real;
        for (int64_t j = 0; j < L && kept < budget; ++j) {
          const bool real = row_mod[j] >= 0;
          if (!real && padding_left == 0) continue;
          padding_left -= real ? 0 : 1;
          idx[kept] = j;
          valid[kept] = real;
          ++kept;
        }
        TORCH_INTERNAL_ASSERT(kept == budget);
        continue;
      }

      std::fill(picked.begin(), picked.end(), 0);
      candidates.clear();
      int64_t recent_left = recent;
      for (int64_t j = L - 1; j >= 0; --j) {  // the last `recent` real tokens are kept as they are
        if (row_mod[j] < 0) continue;
        if (recent_left > 0) {
          picked[j] = 1;
          --recent_left;
        } else {
          candidates.push_back(j);
        }
      }
      pick_best(cross_p + row * L, candidates, k_cross, picked, ranked);
      pick_best(self_p + row * L, candidates, k_self, picked, ranked);

      int64_t kept = 0;
      for (int64_t j = 0; j < L; ++j) {
        if (!picked[j]) continue;
        TORCH_INTERNAL_ASSERT(kept < budget);
        idx[kept] = j;
        valid[kept] = true;
        ++kept;
      }
      TORCH_INTERNAL_ASSERT(kept == budget);
    }
  });
  return {keep_idx, keep_valid};
}

}  // namespace
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CPU, m) { m.impl("select_keep", &cspkv::select_keep_cpu); }
