// CUDA binding of cspkv::compact_kv: checks, one word size for keys and
// values, device guard, one launch for both (kernel in compact_kv.cuh), then, with
// check_indices, the keep_idx value check the kernel recorded (reading it back
// waits for the GPU). Dtype-agnostic: a copy moves bytes.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "compact_kv.cuh"
#include "heuristics.h"
#include "launch.h"
#include "nvtx.h"

namespace cspkv {
namespace cuda {
namespace {

// Largest word (16, 8, 4 bytes, else one element) such that every source row
// starts on a word boundary and spans whole words; one element when the last
// dim is strided.
int64_t word_bytes(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  if (t.stride(3) != 1) return elem;
  const auto address = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  for (const int64_t word : {int64_t{16}, int64_t{8}, int64_t{4}}) {
    if (word <= elem) break;
    bool ok = (t.size(3) * elem) % word == 0 && address % word == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (t.stride(d) * elem) % word == 0;
    if (ok) return word;
  }
  return elem;
}

// `t` as rows of VecT words (sizeof(VecT) divides its row starts and lengths;
// a word of one element may walk a strided last dim).
template <typename VecT>
CompactRows<VecT> rows_of(const at::Tensor& t, at::Tensor& out) {
  const int64_t per_word = static_cast<int64_t>(sizeof(VecT)) / t.element_size();
  return {reinterpret_cast<const VecT*>(t.data_ptr()),
          t.stride(0) / per_word,
          t.stride(1) / per_word,
          t.stride(2) / per_word,
          per_word == 1 ? t.stride(3) : 1,
          reinterpret_cast<VecT*>(out.data_ptr()),
          static_cast<int>(t.size(3) / per_word)};
}

template <typename VecT>
void launch_compact(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& keep_idx, at::Tensor& keys_out,
                    at::Tensor& values_out, int* error_flag, cudaStream_t stream) {
  const CompactRows<VecT> k_rows = rows_of<VecT>(keys, keys_out), v_rows = rows_of<VecT>(values, values_out);
  const int64_t B = keys.size(0), Hkv = keys.size(1), L = keys.size(2), K = keep_idx.size(2);
  const int tx = heuristics::compact_row_threads(std::max(k_rows.nvec, v_rows.nvec));
  const int ty = compact::kThreads / tx;
  const int64_t row_chunks = min_of<int64_t>(ceil_div<int64_t>(K, int64_t{ty} * compact::kRowsPerThread), 65535);
  const dim3 grid(static_cast<unsigned>(B * Hkv), static_cast<unsigned>(row_chunks), 2);
  const dim3 block(tx, ty);
  compact_rows_kernel<VecT><<<grid, block, 0, stream>>>(k_rows, v_rows, keep_idx.data_ptr<int64_t>(),
                                                        static_cast<int>(Hkv), L, K, error_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Keys and values move in one word size: the largest that suits both.
void compact_both(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& keep_idx, at::Tensor& keys_out,
                  at::Tensor& values_out, int* error_flag, cudaStream_t stream) {
  const int64_t word = std::min(word_bytes(keys), word_bytes(values));
  switch (word) {
    case 16:
      return launch_compact<uint4>(keys, values, keep_idx, keys_out, values_out, error_flag, stream);
    case 8:
      return launch_compact<uint2>(keys, values, keep_idx, keys_out, values_out, error_flag, stream);
    case 4:
      return launch_compact<uint32_t>(keys, values, keep_idx, keys_out, values_out, error_flag, stream);
    case 2:
      return launch_compact<uint16_t>(keys, values, keep_idx, keys_out, values_out, error_flag, stream);
    default:
      TORCH_INTERNAL_ASSERT(false, "cspkv.compact_kv: unexpected word size ", word);
  }
}

std::tuple<at::Tensor, at::Tensor> compact_kv_cuda(const at::Tensor& keys, const at::Tensor& values,
                                                   const at::Tensor& keep_idx, bool check_indices) {
  check_compact_kv(keys, values, keep_idx);
  const int64_t B = keys.size(0), Hkv = keys.size(1), L = keys.size(2), K = keep_idx.size(2);
  TORCH_CHECK_VALUE(B * Hkv <= std::numeric_limits<int32_t>::max(), "cspkv.compact_kv: B*Hkv=", B * Hkv,
                    " is too large for the CUDA kernel");

  c10::cuda::OptionalCUDAGuard guard(keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor idx = keep_idx.contiguous();
  at::Tensor keys_out = at::empty({B, Hkv, K, keys.size(3)}, keys.options());
  at::Tensor values_out = at::empty({B, Hkv, K, values.size(3)}, values.options());
  // Without check_indices (the caller vouches for keep_idx, as the pruning
  // path does for select_keep's output) nothing is read back: the op stays
  // asynchronous, and a bad index still only zero-fills its row.
  at::Tensor error_flag = check_indices ? at::zeros({1}, keys.options().dtype(at::kInt)) : at::Tensor();
  int* flag = check_indices ? error_flag.data_ptr<int>() : nullptr;
  {
    NvtxRange range("cspkv::compact_kv");
    compact_both(keys, values, idx, keys_out, values_out, flag, stream);
  }
  if (!check_indices) return {keys_out, values_out};
  // Reading the flag waits for the copies: the price of reporting bad
  // indices as a Python exception with the CPU path's messages.
  const int error = error_flag.item<int>();
  if (error & compact::kErrorRange) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK_INDEX(false, "cspkv.compact_kv: keep_idx values must lie in [0, L=", L, "), got values in [", lo,
                      ", ", hi, "]");
  }
  TORCH_CHECK_VALUE(!(error & compact::kErrorOrder),
                    "cspkv.compact_kv: keep_idx must be strictly ascending along K (sorted, no duplicates)");
  return {keys_out, values_out};
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("compact_kv", &cspkv::cuda::compact_kv_cuda);
}
