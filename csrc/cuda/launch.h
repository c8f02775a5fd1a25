// Host-side helpers shared by the CUDA bindings (torch-aware; the kernels in
// *.cuh are not).
//
// Only c10/cuda headers here, not ATen/cuda/CUDAContext.h: that one pulls in
// cusparse.h / cublas headers, which a bare CUDA toolkit (or torch's own
// include paths) may not provide. c10::cuda::getCurrentCUDAStream is the
// function at::cuda::getCurrentCUDAStream forwards to.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace cspkv {
namespace cuda {

inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

inline int sm_count() {
  return device_attribute(cudaDevAttrMultiProcessorCount);
}

// Kernels index the last dim with stride 1 (and the others with strides): a
// view whose last dim is strided is copied once instead.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// True when every row t[b, h, l, :] of a rank-4 tensor with contiguous rows
// starts on a 16-byte boundary and spans whole 16-byte words, so kernels may
// read rows with 16-byte loads.
inline bool rows_16b_aligned(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  if (t.stride(3) != 1 || (t.size(3) * elem) % 16 != 0) return false;
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if ((t.stride(d) * elem) % 16 != 0) return false;
  }
  return true;
}

// Kernels whose tiles need more than the default 48 KiB of dynamic shared
// memory must opt in, per kernel and per device; setting it on every launch
// keeps that true whichever device is current.
template <typename Kernel>
void set_dynamic_shared_memory(Kernel kernel, size_t bytes, const char* op) {
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  TORCH_CHECK(bytes <= limit, "cspkv.", op, ": the kernel needs ", bytes,
              " bytes of shared memory per block, this device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace cspkv
