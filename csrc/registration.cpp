// One extension, cspkv._C: the op schemas (each backend file registers its own
// implementation with TORCH_LIBRARY_IMPL) and a pybind11 module with build info
// and the pruned cache's store helpers.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>

#include "cache_store/cache_store.h"

#ifndef CSPKV_CUDA_ARCHS
#define CSPKV_CUDA_ARCHS ""
#endif
#ifndef CSPKV_TORCH_VERSION
#define CSPKV_TORCH_VERSION ""
#endif
#ifndef CSPKV_CUDA_VERSION
#define CSPKV_CUDA_VERSION ""
#endif

TORCH_LIBRARY(cspkv, m) {
  m.def(
      "window_scores(Tensor q_win, Tensor keys, Tensor q_mod, Tensor k_mod, *, float scale, float n=1.0,"
      " Tensor? lse=None)"
      " -> (Tensor self_scores, Tensor cross_scores)");
  m.def(
      "select_keep(Tensor self_scores, Tensor cross_scores, Tensor k_mod, *, int budget, int recent,"
      " float cross_ratio) -> (Tensor keep_idx, Tensor keep_valid)");
  m.def(
      "compact_kv(Tensor keys, Tensor values, Tensor keep_idx, *, bool check_indices=True)"
      " -> (Tensor keys_out, Tensor values_out)");
  m.def(
      "nsoftmax_attention(Tensor q, Tensor keys, Tensor values, *, float scale, float n=0.0,"
      " Tensor? kv_valid=None) -> Tensor");
  m.def(
      "packed_attention(Tensor q, Tensor key_data, Tensor value_data, Tensor offsets, Tensor lengths, *,"
      " float scale, float n=0.0) -> Tensor");
}

namespace {

// cspkv::nsoftmax_attention through the dispatcher's typed handle: the same kernels, autocast,
// profiler records and Python dispatch modes as torch.ops.cspkv.nsoftmax_attention, without the
// boxed call's argument matching by schema, which costs a decode step about 2 us per layer.
at::Tensor nsoftmax_attention_call(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, double scale,
                                   double n, const c10::optional<at::Tensor>& kv_valid) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cspkv::nsoftmax_attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                                               const c10::optional<at::Tensor>&)>();
  return op.call(q, keys, values, scale, n, kv_valid);
}

// cspkv::packed_attention by the same typed call: the packed layout's decode attention.
at::Tensor packed_attention_call(const at::Tensor& q, const at::Tensor& key_data, const at::Tensor& value_data,
                                 const at::Tensor& offsets, const at::Tensor& lengths, double scale, double n) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cspkv::packed_attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double, double)>();
  return op.call(q, key_data, value_data, offsets, lengths, scale, n);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cspkv kernels: window scores, keep selection, KV compaction, n-softmax attention, packed attention";
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef CSPKV_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    info["cuda_archs"] = std::string(CSPKV_CUDA_ARCHS);
    info["cuda_version"] = std::string(CSPKV_CUDA_VERSION);
    info["torch_version"] = std::string(CSPKV_TORCH_VERSION);
    return info;
  }, "How this extension was built: with_cuda, cuda_archs, cuda_version, torch_version.");
  m.def("parallel_threads", []() {
    // The chunks at::parallel_for cuts torch's thread count worth of items into:
    // one per thread when this code was compiled with OpenMP, one in all without.
    const int64_t threads = at::get_num_threads();
    std::atomic<int64_t> chunks{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { ++chunks; });
    return chunks.load();
  }, "Threads the CPU kernels' at::parallel_for runs on (torch.get_num_threads() unless built without OpenMP).");
  m.def("nsoftmax_attention", &nsoftmax_attention_call,
        "torch.ops.cspkv.nsoftmax_attention by a typed call: the decode step's attention with less host time.",
        pybind11::arg("q"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("scale"), pybind11::arg("n"),
        pybind11::arg("kv_valid") = pybind11::none());
  m.def("packed_attention", &packed_attention_call,
        "torch.ops.cspkv.packed_attention by a typed call: the packed layout's decode attention.",
        pybind11::arg("q"), pybind11::arg("key_data"), pybind11::arg("value_data"), pybind11::arg("offsets"),
        pybind11::arg("lengths"), pybind11::arg("scale"), pybind11::arg("n"));
  m.def("store_views", &cspkv::store_views, "(keys, values, kv_valid): the first n slots of a pruned layer's store.",
        pybind11::arg("key_slots"), pybind11::arg("value_slots"), pybind11::arg("valid_slots"), pybind11::arg("n"));
  m.def("store_append", &cspkv::store_append,
        "Copy new keys/values [B, Hkv, t, D] into slots [n, n + t) of a pruned layer's store, and their liveness "
        "bool [B, 1 or Hkv, t] if given; return store_views(n + t).",
        pybind11::arg("key_slots"), pybind11::arg("value_slots"), pybind11::arg("valid_slots"), pybind11::arg("n"),
        pybind11::arg("key_states"), pybind11::arg("value_states"), pybind11::arg("live") = pybind11::none());
  m.def("packed_append", &cspkv::packed_append,
        "Write new keys/values [B, Hkv, t, D] at rows offsets + lengths of each (row, KV head) segment of a packed "
        "store [N, D], then lengths += t in place.",
        pybind11::arg("key_data"), pybind11::arg("value_data"), pybind11::arg("offsets"), pybind11::arg("lengths"),
        pybind11::arg("key_states"), pybind11::arg("value_states"));
}
