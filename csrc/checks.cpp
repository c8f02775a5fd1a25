#include "checks.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <c10/util/Exception.h>

namespace cspkv {
namespace {

bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

bool is_id(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

// Rank, dtype class and non-emptiness of one tensor argument.
void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                  const char* layout, bool (*dtype_ok)(const at::Tensor&), const char* dtypes) {
  TORCH_CHECK_VALUE(t.defined(), "cspkv.", op, ": ", name, " must be a tensor ", layout, ", got None");
  TORCH_CHECK_VALUE(t.dim() == rank, "cspkv.", op, ": ", name, " must have rank ", rank, " ", layout,
                    ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(dtype_ok(t), "cspkv.", op, ": ", name, " must be ", dtypes, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() > 0, "cspkv.", op, ": ", name, " must not be empty ", layout,
                    ", got shape ", t.sizes());
}

void check_same_dim(const char* op, const char* what, const char* a, int64_t sa, const char* b,
                    int64_t sb) {
  TORCH_CHECK_VALUE(sa == sb, "cspkv.", op, ": ", what, " mismatch: ", a, " has ", sa, ", ", b,
                    " has ", sb);
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor* first = nullptr;
  bool same = true;
  for (const auto& [name, t] : ts) {
    if (!t->defined()) continue;
    if (first == nullptr) first = t;
    else if (t->device() != first->device()) same = false;
  }
  if (same) return;
  std::ostringstream listing;
  bool comma = false;
  for (const auto& [name, t] : ts) {
    if (!t->defined()) continue;
    listing << (comma ? ", " : "") << name << " on " << t->device();
    comma = true;
  }
  TORCH_CHECK_VALUE(false, "cspkv.", op, ": all tensors must be on one device, got ", listing.str());
}

void check_positive(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, "cspkv.", op, ": ", name,
                    " must be a finite number > 0, got ", v);
}

void check_non_negative(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, "cspkv.", op, ": ", name,
                    " must be a finite number >= 0, got ", v);
}

constexpr const char* kFloats = "float32 or float16 or bfloat16";
constexpr const char* kIds = "int32 or int64";

}  // namespace

WindowScoresShape check_window_scores(const at::Tensor& q_win, const at::Tensor& keys,
                                      const at::Tensor& q_mod, const at::Tensor& k_mod,
                                      double scale, double n, const c10::optional<at::Tensor>& lse) {
  const char* op = "window_scores";
  check_tensor(op, "q_win", q_win, 4, "[B, H, W, D]", is_float, kFloats);
  check_tensor(op, "keys", keys, 4, "[B, Hkv, L, D]", is_float, kFloats);
  check_tensor(op, "q_mod", q_mod, 2, "[B, W]", is_id, kIds);
  check_tensor(op, "k_mod", k_mod, 2, "[B, L]", is_id, kIds);
  check_same_device(op, {{"q_win", &q_win}, {"keys", &keys}, {"q_mod", &q_mod}, {"k_mod", &k_mod}});
  TORCH_CHECK_TYPE(keys.scalar_type() == q_win.scalar_type(), "cspkv.", op,
                   ": keys must have the dtype of q_win (", q_win.scalar_type(), "), got ",
                   keys.scalar_type());
  WindowScoresShape s{q_win.size(0), q_win.size(1), keys.size(1), q_win.size(2), keys.size(2), q_win.size(3)};
  check_same_dim(op, "batch size B", "q_win", s.B, "keys", keys.size(0));
  check_same_dim(op, "batch size B", "q_win", s.B, "q_mod", q_mod.size(0));
  check_same_dim(op, "batch size B", "q_win", s.B, "k_mod", k_mod.size(0));
  check_same_dim(op, "head dim D", "q_win", s.D, "keys", keys.size(3));
  check_same_dim(op, "window W", "q_win", s.W, "q_mod", q_mod.size(1));
  check_same_dim(op, "key length L", "keys", s.L, "k_mod", k_mod.size(1));
  TORCH_CHECK_VALUE(s.H % s.Hkv == 0, "cspkv.", op, ": query heads H=", s.H,
                    " (q_win) must be a multiple of KV heads Hkv=", s.Hkv, " (keys)");
  TORCH_CHECK_VALUE(s.W <= s.L, "cspkv.", op, ": window W=", s.W, " (q_win) must be <= key length L=",
                    s.L, " (keys)");
  check_positive(op, "scale", scale);
  check_non_negative(op, "n", n);
  if (lse.has_value()) {
    auto is_f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat; };
    check_tensor(op, "lse", *lse, 3, "[B, H, W]", is_f32, "float32");
    check_same_device(op, {{"q_win", &q_win}, {"lse", &*lse}});
    TORCH_CHECK_VALUE(lse->sizes() == q_win.sizes().slice(0, 3), "cspkv.", op, ": lse must have shape [B, H, W]=",
                      q_win.sizes().slice(0, 3), " (one log-sum-exp per window query row of q_win), got ", lse->sizes());
  }
  return s;
}

void check_select_keep(const at::Tensor& self_scores, const at::Tensor& cross_scores,
                       const at::Tensor& k_mod, int64_t budget, int64_t recent, double cross_ratio) {
  const char* op = "select_keep";
  auto is_f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat; };
  check_tensor(op, "self_scores", self_scores, 3, "[B, Hkv, L]", is_f32, "float32");
  check_tensor(op, "cross_scores", cross_scores, 3, "[B, Hkv, L]", is_f32, "float32");
  check_tensor(op, "k_mod", k_mod, 2, "[B, L]", is_id, kIds);
  check_same_device(op, {{"self_scores", &self_scores}, {"cross_scores", &cross_scores}, {"k_mod", &k_mod}});
  TORCH_CHECK_VALUE(self_scores.sizes() == cross_scores.sizes(), "cspkv.", op,
                    ": cross_scores must have the shape of self_scores ", self_scores.sizes(), ", got ",
                    cross_scores.sizes());
  const int64_t L = self_scores.size(2);
  check_same_dim(op, "batch size B", "self_scores", self_scores.size(0), "k_mod", k_mod.size(0));
  check_same_dim(op, "key length L", "self_scores", L, "k_mod", k_mod.size(1));
  TORCH_CHECK_VALUE(budget >= 1 && budget <= L, "cspkv.", op, ": budget must be an int in [1, L=", L,
                    "] (tokens kept per row and KV head), got ", budget);
  TORCH_CHECK_VALUE(recent >= 0 && recent <= budget, "cspkv.", op, ": recent must be an int in [0, budget=",
                    budget, "], got ", recent);
  TORCH_CHECK_VALUE(cross_ratio >= 0.0 && cross_ratio <= 1.0, "cspkv.", op,
                    ": cross_ratio must be a number in [0, 1], got ", cross_ratio);
}

void check_compact_kv(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& keep_idx) {
  const char* op = "compact_kv";
  auto is_i64 = [](const at::Tensor& t) { return t.scalar_type() == at::kLong; };
  check_tensor(op, "keys", keys, 4, "[B, Hkv, L, D]", is_float, kFloats);
  check_tensor(op, "values", values, 4, "[B, Hkv, L, Dv]", is_float, kFloats);
  check_tensor(op, "keep_idx", keep_idx, 3, "[B, Hkv, K]", is_i64, "int64");
  check_same_device(op, {{"keys", &keys}, {"values", &values}, {"keep_idx", &keep_idx}});
  TORCH_CHECK_TYPE(values.scalar_type() == keys.scalar_type(), "cspkv.", op,
                   ": values must have the dtype of keys (", keys.scalar_type(), "), got ",
                   values.scalar_type());
  check_same_dim(op, "batch size B", "keys", keys.size(0), "values", values.size(0));
  check_same_dim(op, "batch size B", "keys", keys.size(0), "keep_idx", keep_idx.size(0));
  check_same_dim(op, "KV heads Hkv", "keys", keys.size(1), "values", values.size(1));
  check_same_dim(op, "KV heads Hkv", "keys", keys.size(1), "keep_idx", keep_idx.size(1));
  check_same_dim(op, "key length L", "keys", keys.size(2), "values", values.size(2));
  TORCH_CHECK_VALUE(keep_idx.size(2) <= keys.size(2), "cspkv.", op, ": keep_idx keeps K=", keep_idx.size(2),
                    " tokens, more than the key length L=", keys.size(2));
}

void check_keep_idx_values_cpu(const at::Tensor& keep_idx, int64_t L) {
  const at::Tensor idx = keep_idx.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t K = idx.size(2);
  const int64_t rows = idx.numel() / K;
  int64_t lo = p[0], hi = p[0];
  bool ascending = true;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = p + r * K;
    for (int64_t k = 0; k < K; ++k) {
      lo = std::min(lo, row[k]);
      hi = std::max(hi, row[k]);
      if (k > 0 && row[k] <= row[k - 1]) ascending = false;
    }
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < L, "cspkv.compact_kv: keep_idx values must lie in [0, L=", L,
                    "), got values in [", lo, ", ", hi, "]");
  TORCH_CHECK_VALUE(ascending, "cspkv.compact_kv: keep_idx must be strictly ascending along K (sorted, no duplicates)");
}

void check_nsoftmax_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                              double scale, double n, const c10::optional<at::Tensor>& kv_valid) {
  const char* op = "nsoftmax_attention";
  check_tensor(op, "q", q, 4, "[B, H, Q, D]", is_float, kFloats);
  check_tensor(op, "keys", keys, 4, "[B, Hkv, Lc, D]", is_float, kFloats);
  check_tensor(op, "values", values, 4, "[B, Hkv, Lc, Dv]", is_float, kFloats);
  const at::Tensor valid = kv_valid.has_value() ? *kv_valid : at::Tensor();
  check_same_device(op, {{"q", &q}, {"keys", &keys}, {"values", &values}, {"kv_valid", &valid}});
  TORCH_CHECK_TYPE(keys.scalar_type() == q.scalar_type(), "cspkv.", op, ": keys must have the dtype of q (",
                   q.scalar_type(), "), got ", keys.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == q.scalar_type(), "cspkv.", op,
                   ": values must have the dtype of q (", q.scalar_type(), "), got ", values.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), Hkv = keys.size(1), Lc = keys.size(2);
  check_same_dim(op, "batch size B", "q", B, "keys", keys.size(0));
  check_same_dim(op, "batch size B", "q", B, "values", values.size(0));
  check_same_dim(op, "head dim D", "q", q.size(3), "keys", keys.size(3));
  check_same_dim(op, "KV heads Hkv", "keys", Hkv, "values", values.size(1));
  check_same_dim(op, "cache length Lc", "keys", Lc, "values", values.size(2));
  TORCH_CHECK_VALUE(H % Hkv == 0, "cspkv.", op, ": query heads H=", H,
                    " (q) must be a multiple of KV heads Hkv=", Hkv, " (keys)");
  TORCH_CHECK_VALUE(Q <= Lc, "cspkv.", op, ": queries Q=", Q, " (q) must be <= cache length Lc=", Lc,
                    " (keys): new tokens sit at the end of the cache");
  check_positive(op, "scale", scale);
  check_non_negative(op, "n", n);
  if (valid.defined()) {
    TORCH_CHECK_TYPE(valid.scalar_type() == at::kBool, "cspkv.", op,
                     ": kv_valid must be a bool tensor [B, Lc] or [B, Hkv, Lc], got ", valid.scalar_type());
    const bool ok2 = valid.dim() == 2 && valid.size(0) == B && valid.size(1) == Lc;
    const bool ok3 = valid.dim() == 3 && valid.size(0) == B && valid.size(1) == Hkv && valid.size(2) == Lc;
    TORCH_CHECK_VALUE(ok2 || ok3, "cspkv.", op, ": kv_valid must have shape [B, Lc]=[", B, ", ", Lc,
                      "] or [B, Hkv, Lc]=[", B, ", ", Hkv, ", ", Lc, "], got ", valid.sizes());
  }
}

void check_packed_attention(const at::Tensor& q, const at::Tensor& key_data, const at::Tensor& value_data,
                            const at::Tensor& offsets, const at::Tensor& lengths, double scale, double n) {
  const char* op = "packed_attention";
  auto is_i64 = [](const at::Tensor& t) { return t.scalar_type() == at::kLong; };
  check_tensor(op, "q", q, 4, "[B, H, T, D]", is_float, kFloats);
  check_tensor(op, "key_data", key_data, 2, "[N, D]", is_float, kFloats);
  check_tensor(op, "value_data", value_data, 2, "[N, Dv]", is_float, kFloats);
  check_tensor(op, "offsets", offsets, 1, "[B * Hkv]", is_i64, "int64");
  check_tensor(op, "lengths", lengths, 1, "[B * Hkv]", is_i64, "int64");
  check_same_device(op, {{"q", &q}, {"key_data", &key_data}, {"value_data", &value_data}, {"offsets", &offsets},
                         {"lengths", &lengths}});
  TORCH_CHECK_TYPE(key_data.scalar_type() == q.scalar_type(), "cspkv.", op, ": key_data must have the dtype of q (",
                   q.scalar_type(), "), got ", key_data.scalar_type());
  TORCH_CHECK_TYPE(value_data.scalar_type() == q.scalar_type(), "cspkv.", op,
                   ": value_data must have the dtype of q (", q.scalar_type(), "), got ", value_data.scalar_type());
  const int64_t B = q.size(0), H = q.size(1);
  check_same_dim(op, "head dim D", "q", q.size(3), "key_data", key_data.size(1));
  check_same_dim(op, "rows N", "key_data", key_data.size(0), "value_data", value_data.size(0));
  const int64_t segments = offsets.size(0);
  check_same_dim(op, "segments B*Hkv", "offsets", segments, "lengths", lengths.size(0));
  TORCH_CHECK_VALUE(segments % B == 0, "cspkv.", op,
                    ": offsets must hold B*Hkv entries (one per batch row and KV head), a multiple of B=", B,
                    " (q), got ", segments);
  const int64_t Hkv = segments / B;
  TORCH_CHECK_VALUE(H % Hkv == 0, "cspkv.", op, ": query heads H=", H, " (q) must be a multiple of KV heads Hkv=",
                    Hkv, " (offsets: B*Hkv=", segments, ")");
  check_positive(op, "scale", scale);
  check_non_negative(op, "n", n);
}

void check_packed_segments_cpu(const at::Tensor& offsets, const at::Tensor& lengths, int64_t N) {
  const at::Tensor off = offsets.contiguous(), len = lengths.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* l = len.data_ptr<int64_t>();
  int64_t lo_off = o[0], lo_len = l[0], hi_end = o[0] + l[0];
  for (int64_t s = 0; s < off.numel(); ++s) {
    lo_off = std::min(lo_off, o[s]);
    lo_len = std::min(lo_len, l[s]);
    hi_end = std::max(hi_end, o[s] + l[s]);
  }
  TORCH_CHECK_INDEX(lo_off >= 0 && lo_len >= 0 && hi_end <= N,
                    "cspkv.packed_attention: segments [offsets, offsets + lengths) must lie in [0, N=", N,
                    ") with lengths >= 0, got offsets >= ", lo_off, ", lengths >= ", lo_len, ", ends up to ", hi_end);
}

}  // namespace cspkv
