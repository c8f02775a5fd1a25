// compact_kv on the CPU: gathers the kept rows of K and V into new contiguous
// tensors, an exact copy. Inputs are read through their strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "dispatch.h"
#include "heuristics.h"

namespace cspkv {
namespace {

// out[b, h, k] = src[b, h, keep_idx[b, h, k]], one row of `cols` elements each.
template <typename scalar_t>
void gather_rows(const at::Tensor& src,  // [B, Hkv, L, cols], any strides
                 const int64_t* keep_idx,  // [B, Hkv, K] contiguous, validated
                 at::Tensor& out) {        // [B, Hkv, K, cols] contiguous
  const int64_t Hkv = src.size(1), K = out.size(2), cols = src.size(3);
  const int64_t sb = src.stride(0), sh = src.stride(1), sl = src.stride(2), sc = src.stride(3);
  const scalar_t* in = src.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t rows = out.numel() / cols;
  const int64_t grain = heuristics::cpu_compact_rows_per_task(cols, at::internal::GRAIN_SIZE);
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t b = row / (Hkv * K), h = row / K % Hkv;
      const scalar_t* from = in + b * sb + h * sh + keep_idx[row] * sl;
      scalar_t* to = dst + row * cols;
      if (sc == 1) {
        std::memcpy(to, from, cols * sizeof(scalar_t));
      } else {
        for (int64_t c = 0; c < cols; ++c) to[c] = from[c * sc];
      }
    }
  });
}

// check_indices is ignored: on the CPU the value checks cost no device sync,
// so keep_idx is always validated (a bad index would read out of bounds).
std::tuple<at::Tensor, at::Tensor> compact_kv_cpu(const at::Tensor& keys, const at::Tensor& values,
                                                  const at::Tensor& keep_idx, bool /*check_indices*/) {
  check_compact_kv(keys, values, keep_idx);
  check_keep_idx_values_cpu(keep_idx, keys.size(2));
  const at::Tensor idx = keep_idx.contiguous();
  const int64_t B = keys.size(0), Hkv = keys.size(1), K = idx.size(2);
  at::Tensor keys_out = at::empty({B, Hkv, K, keys.size(3)}, keys.options());
  at::Tensor values_out = at::empty({B, Hkv, K, values.size(3)}, values.options());
  CSPKV_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "compact_kv_cpu", [&] {
    gather_rows<scalar_t>(keys, idx.data_ptr<int64_t>(), keys_out);
    gather_rows<scalar_t>(values, idx.data_ptr<int64_t>(), values_out);
  });
  return {keys_out, values_out};
}

}  // namespace
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CPU, m) { m.impl("compact_kv", &cspkv::compact_kv_cpu); }
