// CUDA binding of cspkv::nsoftmax_attention: checks, device guard, the decode
// kernel (attention_decode.cuh: at most 8 query rows per KV head, half /
// bfloat16, 16-byte aligned rows) or the tiled one (nsoftmax_attention.cuh)
// and their key splits as heuristics.h decides, dtype and head-dim dispatch,
// launches.
#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "attention_decode.cuh"
#include "heuristics.h"
#include "launch.h"
#include "nsoftmax_attention.cuh"
#include "nvtx.h"

namespace cspkv {
namespace cuda {
namespace {

template <int N>
using Int = std::integral_constant<int, N>;

// The kernels' view of q [B, H, Q, D], keys [B, Hkv, Lc, D] and values
// [B, Hkv, Lc, Dv] (rows contiguous), and of kv_valid [B, Lc] or [B, Hkv, Lc]
// (undefined: every slot valid).
template <typename scalar_t>
AttentionParams<scalar_t> attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& valid, double scale, double n) {
  AttentionParams<scalar_t> p;
  p.q = q.data_ptr<scalar_t>();
  p.keys = k.data_ptr<scalar_t>();
  p.values = v.data_ptr<scalar_t>();
  p.kv_valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.q_stride_q = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.k_stride_l = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.v_stride_l = v.stride(2);
  const bool per_head = valid.defined() && valid.dim() == 3;
  p.valid_stride_b = valid.defined() ? valid.stride(0) : 0;
  p.valid_stride_h = per_head ? valid.stride(1) : 0;
  p.valid_stride_l = valid.defined() ? valid.stride(valid.dim() - 1) : 0;
  p.Hkv = static_cast<int>(k.size(1));
  p.G = static_cast<int>(q.size(1) / k.size(1));
  p.Q = static_cast<int>(q.size(2));
  p.Lc = static_cast<int>(k.size(2));
  p.D = static_cast<int>(q.size(3));
  p.Dv = static_cast<int>(v.size(3));
  p.padded_d = padded_head_dim(static_cast<int>(q.size(3)));
  p.q_vec16 = rows_16b_aligned(q);
  p.k_vec16 = rows_16b_aligned(k);
  p.v_vec16 = rows_16b_aligned(v);
  p.scale = static_cast<float>(scale);
  p.use_n = n > 0;
  p.log_n = p.use_n ? static_cast<float>(std::log(n)) : 0.f;
  return p;
}

// Merges the key splits of every query row into the output (nothing to do with one split).
template <typename scalar_t>
void launch_combine(const AttentionParams<scalar_t>& p, int64_t nsplit, int64_t bh_count, const float2* stats,
                    const float* acc, at::Tensor& out, cudaStream_t stream) {
  if (nsplit == 1) return;
  attention_combine_kernel<scalar_t><<<static_cast<unsigned>(bh_count * p.G * p.Q), attention::kCombineThreads, 0,
                                       stream>>>(stats, acc, static_cast<int>(nsplit), p.Dv, p.use_n, p.log_n,
                                                 out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kDvChunks>
void launch_attention(const AttentionParams<scalar_t>& p, int64_t row_tiles, int64_t nsplit, int64_t keys_per_split,
                      int64_t bh_count, const at::Tensor& part_stats, const at::Tensor& part_acc, at::Tensor& out,
                      cudaStream_t stream) {
  const size_t smem = attention::shared_memory_bytes(p.padded_d, p.Dv);
  set_dynamic_shared_memory(attention_split_kernel<scalar_t, kDvChunks>, smem, "nsoftmax_attention");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(nsplit), static_cast<unsigned>(bh_count));
  float2* stats = nsplit > 1 ? reinterpret_cast<float2*>(part_stats.data_ptr<float>()) : nullptr;
  float* acc = nsplit > 1 ? part_acc.data_ptr<float>() : nullptr;
  attention_split_kernel<scalar_t, kDvChunks><<<grid, attention::kThreads, smem, stream>>>(
      p, static_cast<int>(keys_per_split), static_cast<int>(nsplit), stats, acc, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_combine(p, nsplit, bh_count, stats, acc, out, stream);
}

template <typename scalar_t>
void launch_decode(const AttentionParams<scalar_t>& p, int kernel_rows, int chunks, const heuristics::KeySplits& splits,
                   int64_t bh_count, const at::Tensor& part_stats, const at::Tensor& part_acc, at::Tensor& out,
                   cudaStream_t stream) {
  float2* stats = splits.count > 1 ? reinterpret_cast<float2*>(part_stats.data_ptr<float>()) : nullptr;
  float* acc = splits.count > 1 ? part_acc.data_ptr<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>(splits.count), static_cast<unsigned>(bh_count));
  auto launch = [&](auto rows, auto chunks_c) {
    constexpr int kRows = decltype(rows)::value, kChunks = decltype(chunks_c)::value;
    attention_decode_kernel<scalar_t, kRows, kChunks><<<grid, decode::kThreads, 0, stream>>>(
        p, static_cast<int>(splits.keys_per_split), static_cast<int>(splits.count), stats, acc,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (kernel_rows * 10 + chunks) {  // the instances decode::fits admits
    case 11: launch(Int<1>{}, Int<1>{}); break;
    case 12: launch(Int<1>{}, Int<2>{}); break;
    case 21: launch(Int<2>{}, Int<1>{}); break;
    case 22: launch(Int<2>{}, Int<2>{}); break;
    case 41: launch(Int<4>{}, Int<1>{}); break;
    case 42: launch(Int<4>{}, Int<2>{}); break;
    case 81: launch(Int<8>{}, Int<1>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "cspkv.nsoftmax_attention: no decode kernel for ", kernel_rows, " rows x ", chunks, " chunks");
  }
  launch_combine(p, splits.count, bh_count, stats, acc, out, stream);
}

at::Tensor nsoftmax_attention_cuda(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values,
                                   double scale, double n, const c10::optional<at::Tensor>& kv_valid) {
  check_nsoftmax_attention(q_in, keys, values, scale, n, kv_valid);
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = keys.size(1), Lc = keys.size(2), Dv = values.size(3);
  const int64_t G = H / Hkv;
  TORCH_CHECK_VALUE(D <= kMaxHeadDim && Dv <= kMaxHeadDim, "cspkv.nsoftmax_attention: head dims D=", D, ", Dv=", Dv,
                    " must be <= ", kMaxHeadDim, " for the CUDA kernel");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(Lc + attention::kTileKeys <= kIntMax && G * Q <= kIntMax && B * Hkv <= 65535,
                    "cspkv.nsoftmax_attention: sizes too large for the CUDA kernel: need Lc < 2^31, G*Q < 2^31 "
                    "and B*Hkv <= 65535, got Lc=", Lc, ", G*Q=", G * Q, ", B*Hkv=", B * Hkv);

  c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = with_contiguous_rows(q_in);
  const at::Tensor k = with_contiguous_rows(keys);
  const at::Tensor v = with_contiguous_rows(values);
  at::Tensor out = at::empty({B, H, Q, Dv}, q.options());

  const int64_t rows = G * Q;
  const int capped_rows = static_cast<int>(min_of<int64_t>(rows, decode::kMaxRows + 1));  // no int overflow
  const int decode_rows = decode::rows_instance(capped_rows);
  const int decode_chunks = static_cast<int>(ceil_div<int64_t>(max_of(D, Dv), decode::kChunkDims));
  const bool use_decode = heuristics::attention_decode(
      q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
      rows_16b_aligned(q) && rows_16b_aligned(k) && rows_16b_aligned(v), decode::fits(capped_rows, decode_chunks));
  const int64_t row_tiles = ceil_div<int64_t>(rows, attention::kTileRows);
  const heuristics::KeySplits splits =
      use_decode ? heuristics::attention_decode_splits(Lc, B * Hkv, sm_count(),
                                                       decode::kWarps * 2 * decode::unroll(decode_rows),
                                                       attention::kMaxSplits)
                 : heuristics::attention_tiled_splits(Lc, row_tiles * B * Hkv, sm_count(), attention::kTileKeys,
                                                      attention::kMaxSplits);
  const int64_t nsplit = splits.count, keys_per_split = splits.keys_per_split;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_stats, part_acc;
  if (nsplit > 1) {
    part_stats = at::empty({B * Hkv * rows, nsplit, 2}, f32);
    part_acc = at::empty({B * Hkv * rows, nsplit, Dv}, f32);
  }

  const at::Tensor valid = kv_valid.has_value() ? *kv_valid : at::Tensor();

  NvtxRange range("cspkv::nsoftmax_attention");
  CSPKV_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cspkv.nsoftmax_attention", [&] {
    const AttentionParams<scalar_t> p = attention_params<scalar_t>(q, k, v, valid, scale, n);
    if constexpr (sizeof(scalar_t) == 2) {
      if (use_decode) {
        launch_decode<scalar_t>(p, decode_rows, decode_chunks, splits, B * Hkv, part_stats, part_acc, out, stream);
        return;
      }
    }
    // The accumulator of a row is spread over kLanesPerRow threads: Dv / 16 registers each.
    if (Dv <= 64) {
      launch_attention<scalar_t, 4>(p, row_tiles, nsplit, keys_per_split, B * Hkv, part_stats, part_acc, out, stream);
    } else if (Dv <= 128) {
      launch_attention<scalar_t, 8>(p, row_tiles, nsplit, keys_per_split, B * Hkv, part_stats, part_acc, out, stream);
    } else {
      launch_attention<scalar_t, 16>(p, row_tiles, nsplit, keys_per_split, B * Hkv, part_stats, part_acc, out, stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace cspkv

TORCH_LIBRARY_IMPL(cspkv, CUDA, m) {
  m.impl("nsoftmax_attention", &cspkv::cuda::nsoftmax_attention_cuda);
}
