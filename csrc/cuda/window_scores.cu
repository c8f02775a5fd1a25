// CUDA binding of cspkv::window_scores: checks, device guard, dtype dispatch,
// launches (kernels in window_scores.cuh).
#include <cmath>
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "launch.h"
#include "nvtx.h"
#include "window_scores.cuh"

namespace cspkv {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> window_scores_cuda(const at::Tensor& q_win, const at::Tensor& keys,
                                                      const at::Tensor& q_mod, const at::Tensor& k_mod,
                                                      double scale, double n) {
  const WindowScoresShape s = check_window_scores(q_win, keys, q_mod, k_mod, scale, n);
  TORCH_CHECK_VALUE(s.D <= kMaxHeadDim, "cspkv.window_scores: head dim D=", s.D,
                    " is larger than the CUDA kernel supports (", kMaxHeadDim, ")");
  const int64_t G = s.H / s.Hkv;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(s.L + window::kTileKeys <= kIntMax && G * s.W <= kIntMax && s.B * s.Hkv <= 65535,
                    "cspkv.window_scores: sizes too large for the CUDA kernel: need L < 2^31, G*W < 2^31 and "
                    "B*Hkv <= 65535, got L=", s.L, ", G*W=", G * s.W, ", B*Hkv=", s.B * s.Hkv);

  c10::cuda::OptionalCUDAGuard guard(q_win.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = with_contiguous_rows(q_win);
  const at::Tensor k = with_contiguous_rows(keys);
  const at::Tensor qm = q_mod.to(at::kInt).contiguous();
  const at::Tensor km = k_mod.to(at::kInt).contiguous();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor self_scores = at::empty({s.B, s.Hkv, s.L}, f32);
  at::Tensor cross_scores = at::empty({s.B, s.Hkv, s.L}, f32);

  // Pass 1 parallelism: enough (row tile, key split) blocks to fill the GPU
  // about twice; splits are whole key tiles.
  const int64_t rows = G * s.W;
  const int64_t row_tiles = ceil_div<int64_t>(rows, window::kTileRows);
  const int64_t key_tiles = ceil_div<int64_t>(s.L, window::kTileKeys);
  int64_t nsplit = ceil_div<int64_t>(2 * sm_count(), row_tiles * s.B * s.Hkv);
  nsplit = max_of<int64_t>(1, min_of<int64_t>(nsplit, min_of<int64_t>(key_tiles, window::kMaxSplits)));
  const int64_t keys_per_split = ceil_div<int64_t>(key_tiles, nsplit) * window::kTileKeys;
  nsplit = ceil_div<int64_t>(s.L, keys_per_split);  // no empty split

  at::Tensor row_stats = at::empty({s.B * s.Hkv * rows, nsplit, 2}, f32);
  at::Tensor log_denominator = at::empty({s.B * s.Hkv * rows}, f32);
  const bool use_n = n > 0;
  const float log_n = use_n ? static_cast<float>(std::log(n)) : 0.f;
  const int padded_d = padded_head_dim(static_cast<int>(s.D));
  const size_t smem = window::shared_memory_bytes(padded_d);

  NvtxRange range("cspkv::window_scores");
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cspkv.window_scores", [&] {
    WindowScoresParams<scalar_t> p;
    p.q_win = q.data_ptr<scalar_t>();
    p.keys = k.data_ptr<scalar_t>();
    p.q_mod = qm.data_ptr<int32_t>();
    p.k_mod = km.data_ptr<int32_t>();
    p.q_stride_b = q.stride(0);
    p.q_stride_h = q.stride(1);
    p.q_stride_w = q.stride(2);
    p.k_stride_b = k.stride(0);
    p.k_stride_h = k.stride(1);
    p.k_stride_l = k.stride(2);
    p.Hkv = static_cast<int>(s.Hkv);
    p.G = static_cast<int>(G);
    p.W = static_cast<int>(s.W);
    p.L = static_cast<int>(s.L);
    p.D = static_cast<int>(s.D);
    p.padded_d = padded_d;
    p.q_vec16 = rows_16b_aligned(q);
    p.k_vec16 = rows_16b_aligned(k);
    p.scale = static_cast<float>(scale);

    float2* stats = reinterpret_cast<float2*>(row_stats.data_ptr<float>());
    set_dynamic_shared_memory(window_row_stats_kernel<scalar_t>, smem, "window_scores");
    const dim3 stats_grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(nsplit),
                          static_cast<unsigned>(s.B * s.Hkv));
    window_row_stats_kernel<scalar_t><<<stats_grid, window::kThreads, smem, stream>>>(
        p, static_cast<int>(keys_per_split), static_cast<int>(nsplit), stats);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t all_rows = s.B * s.Hkv * rows;
    window_row_lse_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(all_rows, 256)), 256, 0, stream>>>(
        stats, all_rows, static_cast<int>(nsplit), use_n, log_n, log_denominator.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    set_dynamic_shared_memory(window_scores_kernel<scalar_t>, smem, "window_scores");
    const dim3 scores_grid(static_cast<unsigned>(key_tiles), static_cast<unsigned>(s.B * s.Hkv));
    window_scores_kernel<scalar_t><<<scores_grid, window::kThreads, smem, stream>>>(
        p, log_denominator.data_ptr<float>(), self_scores.data_ptr<float>(), cross_scores.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {self_scores, cross_scores};
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("window_scores", &cspkv::cuda::window_scores_cuda);
}
