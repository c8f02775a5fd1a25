// The decode append's copies on a GPU (see store_rows.h): keys, values and
// liveness rows in one launch, blockIdx.y picking the tensor, each thread
// moving whole elements (words of the element size) in a grid-stride loop.
// A decode step moves B x Hkv rows of D elements per tensor: launch cost, not
// bandwidth, is what this saves.
#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/common.cuh"
#include "cuda/nvtx.h"
#include "heuristics.h"
#include "store_append_cuda.h"

namespace cspkv {
namespace cuda {
namespace {

constexpr int kAppendThreads = 256;

template <typename Word>
__device__ __forceinline__ void copy_rows(const StoreRows& r, int64_t first, int64_t step) {
  const int64_t total = r.B * r.H * r.T * r.D;
  Word* dst = reinterpret_cast<Word*>(r.dst);
  const Word* src = reinterpret_cast<const Word*>(r.src);
  for (int64_t i = first; i < total; i += step) {
    const int64_t d = i % r.D, row = i / r.D;
    const int64_t t = row % r.T, h = (row / r.T) % r.H, b = row / (r.T * r.H);
    dst[b * r.dst_stride[0] + h * r.dst_stride[1] + t * r.dst_stride[2] + d] =
        src[b * r.src_stride[0] + h * r.src_stride[1] + t * r.src_stride[2] + d * r.src_stride[3]];
  }
}

// blockIdx.y: 0 keys, 1 values (Word-sized elements), 2 liveness (bytes).
template <typename Word>
__global__ void store_append_kernel(StoreRows keys, StoreRows values, StoreRows live) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (blockIdx.y == 0) {
    copy_rows<Word>(keys, first, step);
  } else if (blockIdx.y == 1) {
    copy_rows<Word>(values, first, step);
  } else {
    copy_rows<uint8_t>(live, first, step);
  }
}

int64_t elements(const StoreRows& r) {
  return r.B * r.H * r.T * r.D;
}

template <typename Word>
void launch_append(const StoreRows& keys, const StoreRows& values, const StoreRows* live, cudaStream_t stream) {
  const int64_t most = std::max({elements(keys), elements(values), live != nullptr ? elements(*live) : int64_t{0}});
  if (most == 0) return;
  const int64_t blocks = heuristics::append_blocks(most, kAppendThreads);
  const dim3 grid(static_cast<unsigned>(blocks), live != nullptr ? 3u : 2u);
  store_append_kernel<Word><<<grid, kAppendThreads, 0, stream>>>(keys, values, live != nullptr ? *live : StoreRows{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void copy_store_rows(c10::Device device, const StoreRows& keys, const StoreRows& values, const StoreRows* live) {
  TORCH_INTERNAL_ASSERT(keys.element_size == values.element_size, "cspkv store: keys and values of different element sizes");
  c10::cuda::OptionalCUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NvtxRange range("cspkv::store_append");
  switch (keys.element_size) {
    case 1:
      return launch_append<uint8_t>(keys, values, live, stream);
    case 2:
      return launch_append<uint16_t>(keys, values, live, stream);
    case 4:
      return launch_append<uint32_t>(keys, values, live, stream);
    case 8:
      return launch_append<uint64_t>(keys, values, live, stream);
    default:
      TORCH_INTERNAL_ASSERT(false, "cspkv store: unexpected element size ", keys.element_size);
  }
}

}  // namespace cuda
}  // namespace cspkv
