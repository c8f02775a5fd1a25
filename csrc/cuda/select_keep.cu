// CUDA binding of cspkv::select_keep: checks, budget split on the host,
// device guard, launch (kernel in select_keep.cuh). Scores are float32 by
// contract, so there is no dtype dispatch.
#include <cmath>
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "launch.h"
#include "nvtx.h"
#include "select_keep.cuh"

namespace cspkv {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> select_keep_cuda(const at::Tensor& self_scores, const at::Tensor& cross_scores,
                                                    const at::Tensor& k_mod, int64_t budget, int64_t recent,
                                                    double cross_ratio) {
  check_select_keep(self_scores, cross_scores, k_mod, budget, recent, cross_ratio);
  const int64_t B = self_scores.size(0), Hkv = self_scores.size(1), L = self_scores.size(2);
  TORCH_CHECK_VALUE(L + select::kThreads <= std::numeric_limits<int32_t>::max(),
                    "cspkv.select_keep: key length L=", L, " is too large for the CUDA kernel (needs L < 2^31)");
  // Exactly Python's int(math.floor(cross_ratio * heavy)) in cspkv.reference.
  const int64_t heavy = budget - recent;
  const int64_t k_cross = static_cast<int64_t>(std::floor(cross_ratio * static_cast<double>(heavy)));
  const int64_t k_self = heavy - k_cross;

  c10::cuda::OptionalCUDAGuard guard(self_scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor self_c = self_scores.contiguous();
  const at::Tensor cross_c = cross_scores.contiguous();
  const at::Tensor km = k_mod.to(at::kInt).contiguous();

  at::Tensor keep_idx = at::empty({B, Hkv, budget}, self_scores.options().dtype(at::kLong));
  at::Tensor keep_valid = at::empty({B, Hkv, budget}, self_scores.options().dtype(at::kBool));
  const bool flags_in_shared = L <= select::kSharedFlagLimit;
  at::Tensor flags = flags_in_shared ? at::Tensor() : at::empty({B * Hkv, L}, self_scores.options().dtype(at::kByte));
  const size_t smem = flags_in_shared ? static_cast<size_t>(L) : 0;

  NvtxRange range("cspkv::select_keep");
  select_keep_kernel<select::kThreads><<<static_cast<unsigned>(B * Hkv), select::kThreads, smem, stream>>>(
      self_c.data_ptr<float>(), cross_c.data_ptr<float>(), km.data_ptr<int32_t>(),
      flags_in_shared ? nullptr : flags.data_ptr<uint8_t>(), keep_idx.data_ptr<int64_t>(), keep_valid.data_ptr<bool>(),
      static_cast<int>(Hkv), static_cast<int>(L), static_cast<int>(budget), static_cast<int>(recent),
      static_cast<int>(k_cross), static_cast<int>(k_self));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep_idx, keep_valid};
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("select_keep", &cspkv::cuda::select_keep_cuda);
}
