// Host-side helpers of the pruned cache's store (see cache_store.cpp); bound
// in registration.cpp as cspkv._C.store_views / store_append.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace cspkv {

// The first n slots of a store: (keys, values, kv_valid) views.
std::tuple<at::Tensor, at::Tensor, at::Tensor> store_views(const at::Tensor& key_slots, const at::Tensor& value_slots,
                                                            const at::Tensor& valid_slots, int64_t n);

// Copies the new tokens [B, Hkv, t, D] into slots [n, n + t) and, if given, their liveness
// bool [B, 1 or Hkv, t] into the valid slots (free slots are live already); returns
// store_views(n + t).
std::tuple<at::Tensor, at::Tensor, at::Tensor> store_append(const at::Tensor& key_slots, const at::Tensor& value_slots,
                                                             const at::Tensor& valid_slots, int64_t n,
                                                             const at::Tensor& key_states,
                                                             const at::Tensor& value_states,
                                                             const c10::optional<at::Tensor>& live);

// The packed layout's append: new keys/values [B, Hkv, t, D] of segment s = b * Hkv + h go to rows
// offsets[s] + lengths[s] + [0, t) of key_data / value_data [N, D], then lengths += t (in place).
// The caller guarantees the room (each segment's capacity); the CPU path checks it.
void packed_append(const at::Tensor& key_data, const at::Tensor& value_data, const at::Tensor& offsets,
                   const at::Tensor& lengths, const at::Tensor& key_states, const at::Tensor& value_states);

}  // namespace cspkv
