// CUDA binding of cspkv::packed_attention: checks, device guard, one launch of
// packed_attention_kernel (packed_attention.cuh) per call, dtype dispatch.
// The segments' values are not checked here (that would wait for the GPU):
// a segment outside [0, N) gives zeros.
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "launch.h"
#include "nvtx.h"
#include "packed_attention.cuh"

namespace cspkv {
namespace cuda {
namespace {

at::Tensor packed_attention_cuda(const at::Tensor& q_in, const at::Tensor& key_data, const at::Tensor& value_data,
                                 const at::Tensor& offsets, const at::Tensor& lengths, double scale, double n) {
  check_packed_attention(q_in, key_data, value_data, offsets, lengths, scale, n);
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D = q_in.size(3), Dv = value_data.size(1);
  TORCH_CHECK_VALUE(D <= kMaxHeadDim && Dv <= kMaxHeadDim, "cspkv.packed_attention: head dims D=", D, ", Dv=", Dv,
                    " must be <= ", kMaxHeadDim, " for the CUDA kernel");
  constexpr int64_t kGridMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(B * H * T <= kGridMax, "cspkv.packed_attention: sizes too large for the CUDA kernel: need "
                    "B*H*T < 2^31, got ", B * H * T);

  c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = with_contiguous_rows(q_in);
  const at::Tensor k = with_contiguous_rows(key_data);
  const at::Tensor v = with_contiguous_rows(value_data);
  const at::Tensor off = offsets.contiguous(), len = lengths.contiguous();
  at::Tensor out = at::empty({B, H, T, Dv}, q.options());

  NvtxRange range("cspkv::packed_attention");
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cspkv.packed_attention", [&] {
    packed::Params<scalar_t> p;
    p.q = q.data_ptr<scalar_t>();
    p.key_data = k.data_ptr<scalar_t>();
    p.value_data = v.data_ptr<scalar_t>();
    p.offsets = off.data_ptr<int64_t>();
    p.lengths = len.data_ptr<int64_t>();
    p.out = out.data_ptr<scalar_t>();
    p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_t = q.stride(2);
    p.k_stride = k.stride(0), p.v_stride = v.stride(0);
    p.N = k.size(0);
    p.H = static_cast<int>(H), p.Hkv = static_cast<int>(off.size(0) / B), p.T = static_cast<int>(T);
    p.D = static_cast<int>(D), p.Dv = static_cast<int>(Dv);
    p.scale = static_cast<float>(scale);
    p.use_n = n > 0;
    p.log_n = p.use_n ? static_cast<float>(std::log(n)) : 0.f;
    const size_t smem = sizeof(float) * static_cast<size_t>(D);
    packed_attention_kernel<scalar_t><<<static_cast<unsigned>(B * H * T), packed::kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("packed_attention", &cspkv::cuda::packed_attention_cuda);
}
