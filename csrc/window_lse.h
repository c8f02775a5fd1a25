// window_scores with a given `lse` (each window query row's log-sum-exp over
// the keys it may see, e.g. from the prefill attention) skips the kernels'
// first pass: this turns the log-sum-exp into the log n-softmax denominator
// that the second pass divides by. CPU and CUDA share it.
#pragma once

#include <cmath>
#include <limits>

#include <ATen/ATen.h>

namespace cspkv {

// lse float32 [B, H, W] (any strides) -> contiguous float32 [B, H, W] holding
// logaddexp(lse, log n), or lse for n = 0. A row whose lse is -inf sees no key:
// it gets +inf, so that any probability it could add is exp(-inf) = 0.
// Three or four elementwise kernels on a GPU, per layer; `where` writes the
// result in one go. log n lives on lse's device: logaddexp's device check
// refuses a CPU scalar tensor beside a CUDA one.
inline at::Tensor window_log_denominator(const at::Tensor& lse, double n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const at::Tensor den = n > 0 ? at::logaddexp(lse, at::scalar_tensor(std::log(n), lse.options().dtype(at::kFloat))) : lse;
  return at::where(lse == -kInf, at::Scalar(kInf), den).contiguous();
}

}  // namespace cspkv
