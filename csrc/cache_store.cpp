// The decode step's append to a pruned layer's store (cspkv/cache.py, _Store),
// in one call from Python: two token copies, the new slots' liveness when the
// call has a 2-D attention mask, and three views would otherwise be five to
// seven Python-level tensor calls per layer per token, 10 us and more of host
// time on the step that a GPU decode waits for.
#include "cache_store.h"

#include <ATen/ATen.h>

#include <vector>

namespace cspkv {
namespace {

// slots[:, :, first : first + count] as one as_strided call: narrow() goes through
// slice() to the same view, three dispatcher calls where this is one.
at::Tensor slot_range(const at::Tensor& slots, int64_t first, int64_t count) {
  std::vector<int64_t> sizes = slots.sizes().vec();
  sizes[2] = count;
  return slots.as_strided(sizes, slots.strides(), slots.storage_offset() + first * slots.stride(2));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> store_views(const at::Tensor& key_slots, const at::Tensor& value_slots,
                                                            const at::Tensor& valid_slots, int64_t n) {
  TORCH_CHECK(key_slots.dim() == 4 && value_slots.dim() == 4 && valid_slots.dim() == 3,
              "cspkv store: expected key/value slots [B, Hkv, capacity, D] and valid slots [B, Hkv, capacity]");
  TORCH_CHECK(n >= 0 && n <= key_slots.size(2) && key_slots.size(2) == value_slots.size(2) &&
                  key_slots.size(2) == valid_slots.size(2),
              "cspkv store: ", n, " slots asked of a store of ", key_slots.size(2));
  return {slot_range(key_slots, 0, n), slot_range(value_slots, 0, n), slot_range(valid_slots, 0, n)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> store_append(const at::Tensor& key_slots, const at::Tensor& value_slots,
                                                             const at::Tensor& valid_slots, int64_t n,
                                                             const at::Tensor& key_states,
                                                             const at::Tensor& value_states,
                                                             const c10::optional<at::Tensor>& live) {
  TORCH_CHECK(key_states.dim() == 4 && value_states.dim() == 4 && key_states.size(2) == value_states.size(2),
              "cspkv store: expected new keys and values [B, Hkv, t, D] with the same t");
  const int64_t t = key_states.size(2);
  TORCH_CHECK(key_slots.dim() == 4 && n >= 0 && n + t <= key_slots.size(2), "cspkv store: appending ", t,
              " tokens after ", n, " overflows a store of ", key_slots.size(2));
  at::Tensor key_dst = slot_range(key_slots, n, t), value_dst = slot_range(value_slots, n, t);
  TORCH_CHECK(key_dst.sizes() == key_states.sizes() && value_dst.sizes() == value_states.sizes(),
              "cspkv store: new keys ", key_states.sizes(), " and values ", value_states.sizes(),
              " do not match the stored ", key_dst.sizes(), " and ", value_dst.sizes());
  key_dst.copy_(key_states);
  value_dst.copy_(value_states);
  if (live.has_value()) {  // the free slots are live; write the call's mask only where it is given
    const at::Tensor valid_dst = slot_range(valid_slots, n, t);
    TORCH_CHECK(live->scalar_type() == at::kBool && live->dim() == 3 && live->size(0) == valid_dst.size(0) &&
                    (live->size(1) == 1 || live->size(1) == valid_dst.size(1)) && live->size(2) == t,
                "cspkv store: the new tokens' liveness must be bool [B, 1 or Hkv, t] = [", valid_dst.size(0), ", 1 or ",
                valid_dst.size(1), ", ", t, "], got ", live->scalar_type(), " ", live->sizes());
    valid_dst.copy_(*live);
  }
  return store_views(key_slots, value_slots, valid_slots, n + t);
}

}  // namespace cspkv
