// Argument checks shared by the CPU and CUDA implementations of every op.
// Messages mirror cspkv/ops/checks.py: they name the op, the argument and what
// was expected, and surface in Python as ValueError / TypeError / IndexError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace cspkv {

// Shapes of one window_scores call, read after the checks pass.
struct WindowScoresShape {
  int64_t B, H, Hkv, W, L, D;
};

WindowScoresShape check_window_scores(const at::Tensor& q_win, const at::Tensor& keys,
                                      const at::Tensor& q_mod, const at::Tensor& k_mod,
                                      double scale, double n, const c10::optional<at::Tensor>& lse);

// Value checks on keep_idx (range, strict order) need the data: the CPU
// implementation runs them on the host, the CUDA one inside its kernel.
void check_select_keep(const at::Tensor& self_scores, const at::Tensor& cross_scores,
                       const at::Tensor& k_mod, int64_t budget, int64_t recent,
                       double cross_ratio);

void check_compact_kv(const at::Tensor& keys, const at::Tensor& values,
                      const at::Tensor& keep_idx);

// Host-side value check of keep_idx for the CPU path (reads every index).
void check_keep_idx_values_cpu(const at::Tensor& keep_idx, int64_t L);

void check_nsoftmax_attention(const at::Tensor& q, const at::Tensor& keys,
                              const at::Tensor& values, double scale, double n,
                              const c10::optional<at::Tensor>& kv_valid);

// Shapes, dtypes, devices and scalars of packed_attention (no data read).
void check_packed_attention(const at::Tensor& q, const at::Tensor& key_data, const at::Tensor& value_data,
                            const at::Tensor& offsets, const at::Tensor& lengths, double scale, double n);

// Host-side value check of the segments for the CPU path: every [offsets, offsets + lengths)
// inside [0, N), lengths >= 0 (reads every entry).
void check_packed_segments_cpu(const at::Tensor& offsets, const at::Tensor& lengths, int64_t N);

}  // namespace cspkv
