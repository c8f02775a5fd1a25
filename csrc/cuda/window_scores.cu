// CUDA binding of cspkv::window_scores: checks, device guard, the tensor-core
// kernels (window_scores_mma.cuh) or the CUDA-core ones (window_scores.cuh) as
// heuristics.h decides, dtype dispatch, launches.
#include <cmath>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "heuristics.h"
#include "launch.h"
#include "nvtx.h"
#include "window_lse.h"
#include "window_scores.cuh"
#include "window_scores_mma.cuh"

namespace cspkv {
namespace cuda {
namespace {

static_assert(window::kTileKeys == window_mma::kStreamed, "pass 1 key splits are whole key tiles of either kernel");

// True when the tensor-core kernels were compiled for sm_80 or newer in the
// binary this device runs (an older-architecture build of them only traps).
// Asked of the driver once per device, not on every call.
bool tensor_core_kernels_runnable() {
  static std::mutex mutex;
  static std::unordered_map<int, bool> known;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(device);
  if (it != known.end()) return it->second;
  cudaFuncAttributes attr;
  bool runnable = false;
  if (cudaFuncGetAttributes(&attr, window_scores_mma_kernel<true, 64, 1>) == cudaSuccess) {
    runnable = attr.ptxVersion >= 80;
  } else {
    (void)cudaGetLastError();  // no loadable image for this device: clear the error, use the CUDA-core kernels
  }
  known.emplace(device, runnable);
  return runnable;
}

template <typename T>
WindowScoresParams<T> window_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qm, const at::Tensor& km,
                                    const WindowScoresShape& s, int64_t G, double scale, bool q_vec16, bool k_vec16) {
  WindowScoresParams<T> p;
  p.q_win = reinterpret_cast<const T*>(q.data_ptr());
  p.keys = reinterpret_cast<const T*>(k.data_ptr());
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
  p.padded_d = padded_head_dim(static_cast<int>(s.D));
  p.w_divmod = FastDivmod::make(p.W);
  p.q_vec16 = q_vec16;
  p.k_vec16 = k_vec16;
  p.scale = static_cast<float>(scale);
  return p;
}

// Calls f(std::bool_constant<bf16>, std::integral_constant<int, kD>) for the
// tensor-core kernel instantiation of a dtype and head dim.
template <typename F>
void with_mma_instance(bool bf16, int64_t D, F&& f) {
  auto by_dim = [&](auto is_bf16) {
    switch (window_mma::padded_dim(static_cast<int>(D))) {
      case 64:
        f(is_bf16, std::integral_constant<int, 64>{});
        break;
      case 128:
        f(is_bf16, std::integral_constant<int, 128>{});
        break;
      default:
        f(is_bf16, std::integral_constant<int, 256>{});
    }
  };
  if (bf16) {
    by_dim(std::true_type{});
  } else {
    by_dim(std::false_type{});
  }
}

std::tuple<at::Tensor, at::Tensor> window_scores_cuda(const at::Tensor& q_win, const at::Tensor& keys,
                                                      const at::Tensor& q_mod, const at::Tensor& k_mod,
                                                      double scale, double n, const c10::optional<at::Tensor>& lse) {
  const WindowScoresShape s = check_window_scores(q_win, keys, q_mod, k_mod, scale, n, lse);
  TORCH_CHECK_VALUE(s.D <= kMaxHeadDim, "cspkv.window_scores: head dim D=", s.D,
                    " is larger than the CUDA kernel supports (", kMaxHeadDim, ")");
  const int64_t G = s.H / s.Hkv;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(s.L + window_mma::kMaxScoreKeys <= kIntMax && G * s.W <= kIntMax && s.B * s.Hkv <= 65535,
                    "cspkv.window_scores: sizes too large for the CUDA kernel: need L < 2^31, G*W < 2^31 and "
                    "B*Hkv <= 65535, got L=", s.L, ", G*W=", G * s.W, ", B*Hkv=", s.B * s.Hkv);

  c10::cuda::OptionalCUDAGuard guard(q_win.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = with_contiguous_rows(q_win);
  const at::Tensor k = with_contiguous_rows(keys);
  const at::Tensor qm = q_mod.to(at::kInt).contiguous();
  const at::Tensor km = k_mod.to(at::kInt).contiguous();
  const bool q_vec16 = rows_16b_aligned(q), k_vec16 = rows_16b_aligned(k);
  const bool half_precision = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const bool tensor_cores =
      heuristics::window_tensor_cores(half_precision, q_vec16 && k_vec16, tensor_core_kernels_runnable());

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor self_scores = at::empty({s.B, s.Hkv, s.L}, f32);
  at::Tensor cross_scores = at::empty({s.B, s.Hkv, s.L}, f32);

  // Pass 1, skipped when the caller gives each row's log-sum-exp: row
  // statistics per (row tile, key split) block; pass 1b merges them into the
  // log n-softmax denominator of each row.
  NvtxRange range("cspkv::window_scores");
  const int64_t rows = G * s.W;
  const int64_t all_rows = s.B * s.Hkv * rows;
  const int64_t row_tiles = ceil_div<int64_t>(rows, tensor_cores ? window_mma::kStationary : window::kTileRows);
  heuristics::KeySplits splits{0, 0};
  at::Tensor row_stats, log_denominator;
  if (lse.has_value()) {
    log_denominator = window_log_denominator(*lse, n);  // [B, H, W] = [B * Hkv, G * W]: row r = g * W + w
  } else {
    splits = heuristics::window_stats_splits(s.L, row_tiles * s.B * s.Hkv, sm_count(), window::kTileKeys,
                                             window::kMaxSplits);
    row_stats = at::empty({all_rows, splits.count, 2}, f32);
    log_denominator = at::empty({all_rows}, f32);
  }
  const bool pass1 = !lse.has_value();
  float2* stats = pass1 ? reinterpret_cast<float2*>(row_stats.data_ptr<float>()) : nullptr;
  const int nsplit = static_cast<int>(splits.count), keys_per_split = static_cast<int>(splits.keys_per_split);
  const dim3 stats_grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(nsplit),
                        static_cast<unsigned>(s.B * s.Hkv));
  const bool use_n = n > 0;
  const float log_n = use_n ? static_cast<float>(std::log(n)) : 0.f;
  auto merge_splits = [&] {  // pass 1b, shared by both kernel families
    window_row_lse_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(all_rows, 256)), 256, 0, stream>>>(
        stats, all_rows, nsplit, use_n, log_n, log_denominator.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  if (tensor_cores) {
    const WindowScoresParams<uint16_t> p = window_params<uint16_t>(q, k, qm, km, s, G, scale, q_vec16, k_vec16);
    with_mma_instance(q.scalar_type() == at::kBFloat16, s.D, [&](auto is_bf16, auto kd) {
      constexpr bool kBF16 = decltype(is_bf16)::value;
      constexpr int kD = decltype(kd)::value;
      if (pass1) {
        const size_t smem = window_mma::shared_memory_bytes(kD, window_mma::kStationary);
        set_dynamic_shared_memory(window_row_stats_mma_kernel<kBF16, kD>, smem, "window_scores");
        window_row_stats_mma_kernel<kBF16, kD><<<stats_grid, window_mma::kThreads, smem, stream>>>(
            p, keys_per_split, nsplit, stats);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_splits();
      }
      auto score = [&](auto m_tiles) {
        constexpr int kMTiles = decltype(m_tiles)::value;
        constexpr int kKeys = window_mma::score_keys(kMTiles);
        const size_t smem = window_mma::shared_memory_bytes(kD, kKeys);
        set_dynamic_shared_memory(window_scores_mma_kernel<kBF16, kD, kMTiles>, smem, "window_scores");
        const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(s.L, kKeys)), static_cast<unsigned>(s.B * s.Hkv));
        window_scores_mma_kernel<kBF16, kD, kMTiles><<<grid, window_mma::kThreads, smem, stream>>>(
            p, log_denominator.data_ptr<float>(), self_scores.data_ptr<float>(), cross_scores.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if constexpr (heuristics::window_max_key_tiles(kD) == 2) {
        if (heuristics::window_two_key_tiles(rows, s.L, s.B * s.Hkv, sm_count(), window_mma::kStreamed,
                                             window_mma::score_keys(2))) {
          score(std::integral_constant<int, 2>{});
          return;
        }
      }
      score(std::integral_constant<int, 1>{});
    });
  } else {
    CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cspkv.window_scores", [&] {
      const WindowScoresParams<scalar_t> p = window_params<scalar_t>(q, k, qm, km, s, G, scale, q_vec16, k_vec16);
      const size_t smem = window::shared_memory_bytes(p.padded_d);
      if (pass1) {
        set_dynamic_shared_memory(window_row_stats_kernel<scalar_t>, smem, "window_scores");
        window_row_stats_kernel<scalar_t><<<stats_grid, window::kThreads, smem, stream>>>(
            p, keys_per_split, nsplit, stats);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_splits();
      }
      set_dynamic_shared_memory(window_scores_kernel<scalar_t>, smem, "window_scores");
      const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(s.L, window::kTileKeys)),
                      static_cast<unsigned>(s.B * s.Hkv));
      window_scores_kernel<scalar_t><<<grid, window::kThreads, smem, stream>>>(
          p, log_denominator.data_ptr<float>(), self_scores.data_ptr<float>(), cross_scores.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {self_scores, cross_scores};
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("window_scores", &cspkv::cuda::window_scores_cuda);
}
