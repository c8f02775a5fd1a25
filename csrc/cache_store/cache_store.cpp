// The decode step's append to a pruned layer's store (cspkv/hf/cache.py, _Store),
// in one call from Python: the token copies and, when the call has a 2-D
// attention mask, the new slots' liveness, then three views. On CPU tensors
// and on CUDA tensors of a CUDA build the copies are one loop / one kernel
// launch for keys, values and liveness (store_rows.h); otherwise (new tokens
// of another dtype or device than the store, CUDA tensors of a CPU-only build)
// three copy_ calls, which convert. From Python the same work would be five
// to seven tensor calls per layer, 10 us and more of host time on the step
// that a GPU decode waits for.
#include "cache_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "heuristics.h"
#include "store_rows.h"

#ifdef CSPKV_WITH_CUDA
#include "store_append_cuda.h"
#endif

namespace cspkv {
namespace {

// slots[:, :, first : first + count] as one as_strided call: narrow() goes through
// slice() to the same view, three dispatcher calls where this is one.
at::Tensor slot_range(const at::Tensor& slots, int64_t first, int64_t count) {
  std::vector<int64_t> sizes = slots.sizes().vec();
  sizes[2] = count;
  return slots.as_strided(sizes, slots.strides(), slots.storage_offset() + first * slots.stride(2));
}

// `rows` [B, H, T, D] into slots [n, n + T) of `slots` [B, H, capacity, D] (whose last dim is contiguous).
StoreRows store_rows(const at::Tensor& slots, int64_t n, const at::Tensor& rows) {
  StoreRows r;
  r.element_size = slots.element_size();
  r.dst = static_cast<char*>(slots.data_ptr()) + n * slots.stride(2) * r.element_size;
  r.src = static_cast<const char*>(rows.data_ptr());
  for (int d = 0; d < 3; ++d) r.dst_stride[d] = slots.stride(d);
  for (int d = 0; d < 4; ++d) r.src_stride[d] = rows.stride(d);
  r.B = rows.size(0), r.H = rows.size(1), r.T = rows.size(2), r.D = rows.size(3);
  return r;
}

// The liveness bool [B, 1 or H, T] into slots [n, n + T) of the valid slots [B, H, capacity], as rows of
// one element (one head's liveness is read for every head).
StoreRows liveness_rows(const at::Tensor& valid_slots, int64_t n, const at::Tensor& live) {
  StoreRows r;
  r.element_size = 1;
  r.dst = static_cast<char*>(valid_slots.data_ptr()) + n * valid_slots.stride(2);
  r.src = static_cast<const char*>(live.data_ptr());
  for (int d = 0; d < 3; ++d) r.dst_stride[d] = valid_slots.stride(d);
  r.src_stride[0] = live.stride(0), r.src_stride[1] = live.size(1) == 1 ? 0 : live.stride(1);
  r.src_stride[2] = live.stride(2), r.src_stride[3] = 1;
  r.B = valid_slots.size(0), r.H = valid_slots.size(1), r.T = live.size(2), r.D = 1;
  return r;
}

void copy_rows_cpu(const StoreRows& r) {
  const int64_t rows = r.B * r.H * r.T, es = r.element_size;
  at::parallel_for(0, rows, heuristics::cpu_append_rows_per_task(r.D * es), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % r.T, h = (row / r.T) % r.H, b = row / (r.T * r.H);
      char* dst = r.dst + (b * r.dst_stride[0] + h * r.dst_stride[1] + t * r.dst_stride[2]) * es;
      const char* src = r.src + (b * r.src_stride[0] + h * r.src_stride[1] + t * r.src_stride[2]) * es;
      if (r.src_stride[3] == 1 || r.D == 1) {
        std::memcpy(dst, src, r.D * es);
      } else {
        for (int64_t d = 0; d < r.D; ++d) std::memcpy(dst + d * es, src + d * r.src_stride[3] * es, es);
      }
    }
  });
}

// Whether the copies can skip copy_: the new tokens in the store's dtype, keys and values of one
// element size (1, 2, 4 or 8 bytes), one device with kernels in this build, a store whose rows are
// contiguous.
bool copies_fuse(const at::Tensor& key_slots, const at::Tensor& value_slots, const at::Tensor& valid_slots,
                 const at::Tensor& key_states, const at::Tensor& value_states, const c10::optional<at::Tensor>& live) {
  const at::Device device = key_slots.device();
#ifdef CSPKV_WITH_CUDA
  const bool kernels = device.is_cpu() || device.is_cuda();
#else
  const bool kernels = device.is_cpu();
#endif
  const int64_t size = key_slots.element_size();
  bool same = kernels && key_states.scalar_type() == key_slots.scalar_type() &&
              value_states.scalar_type() == value_slots.scalar_type() && value_slots.element_size() == size &&
              (size == 1 || size == 2 || size == 4 || size == 8) && key_slots.stride(3) == 1 && value_slots.stride(3) == 1;
  for (const at::Tensor* t : {&value_slots, &valid_slots, &key_states, &value_states}) same = same && t->device() == device;
  return same && (!live.has_value() || live->device() == device);
}

// New rows [B, H, T, D] as the source of a packed append; dst is the packed data [N, D].
StoreRows packed_rows(const at::Tensor& data, const at::Tensor& rows) {
  StoreRows r;
  r.element_size = data.element_size();
  r.dst = static_cast<char*>(data.data_ptr());
  r.src = static_cast<const char*>(rows.data_ptr());
  r.dst_stride[0] = r.dst_stride[1] = 0;
  r.dst_stride[2] = data.stride(0);
  for (int d = 0; d < 4; ++d) r.src_stride[d] = rows.stride(d);
  r.B = rows.size(0), r.H = rows.size(1), r.T = rows.size(2), r.D = rows.size(3);
  return r;
}

// Row t of segment s = b * H + h goes to data row offsets[s] + lengths[s] + t.
void copy_segment_rows_cpu(const StoreRows& r, const int64_t* offsets, const int64_t* lengths, int64_t t_count) {
  const int64_t rows = r.B * r.H * r.T, es = r.element_size;
  at::parallel_for(0, rows, heuristics::cpu_append_rows_per_task(r.D * es), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % t_count, s = row / t_count, h = s % r.H, b = s / r.H;
      char* dst = r.dst + (offsets[s] + lengths[s] + t) * r.dst_stride[2] * es;
      const char* src = r.src + (b * r.src_stride[0] + h * r.src_stride[1] + t * r.src_stride[2]) * es;
      if (r.src_stride[3] == 1 || r.D == 1) {
        std::memcpy(dst, src, r.D * es);
      } else {
        for (int64_t d = 0; d < r.D; ++d) std::memcpy(dst + d * es, src + d * r.src_stride[3] * es, es);
      }
    }
  });
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
  if (live.has_value()) {  // the free slots are live; write the call's mask only where it is given
    TORCH_CHECK(live->scalar_type() == at::kBool && live->dim() == 3 && live->size(0) == key_states.size(0) &&
                    (live->size(1) == 1 || live->size(1) == valid_slots.size(1)) && live->size(2) == t &&
                    valid_slots.scalar_type() == at::kBool && valid_slots.dim() == 3 &&
                    valid_slots.size(0) == key_slots.size(0) &&
                    valid_slots.size(1) == key_slots.size(1) && valid_slots.size(2) == key_slots.size(2),
                "cspkv store: the new tokens' liveness must be bool [B, 1 or Hkv, t] = [", key_states.size(0),
                ", 1 or ", key_states.size(1), ", ", t, "], got ", live->scalar_type(), " ", live->sizes());
  }
  if (!copies_fuse(key_slots, value_slots, valid_slots, key_states, value_states, live)) {
    key_dst.copy_(key_states);
    value_dst.copy_(value_states);
    if (live.has_value()) slot_range(valid_slots, n, t).copy_(*live);
  } else {
    const StoreRows keys = store_rows(key_slots, n, key_states), values = store_rows(value_slots, n, value_states);
    const StoreRows valid = live.has_value() ? liveness_rows(valid_slots, n, *live) : StoreRows{};
    if (key_slots.is_cpu()) {
      copy_rows_cpu(keys);
      copy_rows_cpu(values);
      if (live.has_value()) copy_rows_cpu(valid);
    } else {
#ifdef CSPKV_WITH_CUDA
      cuda::copy_store_rows(key_slots.device(), keys, values, live.has_value() ? &valid : nullptr);
#endif
    }
  }
  return store_views(key_slots, value_slots, valid_slots, n + t);
}

void packed_append(const at::Tensor& key_data, const at::Tensor& value_data, const at::Tensor& offsets,
                   const at::Tensor& lengths, const at::Tensor& key_states, const at::Tensor& value_states) {
  TORCH_CHECK(key_states.dim() == 4 && value_states.dim() == 4 && key_states.size(2) == value_states.size(2) &&
                  key_data.dim() == 2 && value_data.dim() == 2 && key_data.size(1) == key_states.size(3) &&
                  value_data.size(1) == value_states.size(3),
              "cspkv packed store: expected new keys and values [B, Hkv, t, D] and data [N, D], got ",
              key_states.sizes(), ", ", value_states.sizes(), ", ", key_data.sizes(), ", ", value_data.sizes());
  const int64_t segments = key_states.size(0) * key_states.size(1), t = key_states.size(2);
  TORCH_CHECK(offsets.dim() == 1 && lengths.dim() == 1 && offsets.size(0) == segments &&
                  lengths.size(0) == segments && offsets.scalar_type() == at::kLong &&
                  lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "cspkv packed store: offsets and lengths must be int64 [B * Hkv] = [", segments, "]");
  const bool direct = key_data.is_cpu() && value_data.is_cpu() && key_states.is_cpu() && value_states.is_cpu() &&
                      offsets.is_cpu() && lengths.is_cpu() && key_states.scalar_type() == key_data.scalar_type() &&
                      value_states.scalar_type() == value_data.scalar_type() && key_data.stride(1) == 1 &&
                      value_data.stride(1) == 1;
  if (direct) {
    const at::Tensor off = offsets.contiguous();
    const int64_t* o = off.data_ptr<int64_t>();
    int64_t* len = lengths.data_ptr<int64_t>();
    for (int64_t s = 0; s < segments; ++s) {
      TORCH_CHECK(o[s] >= 0 && len[s] >= 0 && o[s] + len[s] + t <= key_data.size(0),
                  "cspkv packed store: segment ", s, " at ", o[s], " with ", len[s], " slots has no room for ", t,
                  " more in ", key_data.size(0), " rows");
    }
    const StoreRows keys = packed_rows(key_data, key_states), values = packed_rows(value_data, value_states);
    copy_segment_rows_cpu(keys, o, len, t);
    copy_segment_rows_cpu(values, o, len, t);
    for (int64_t s = 0; s < segments; ++s) len[s] += t;
    return;
  }
  // Other devices: one index_copy_ per tensor (rows computed on the device, no sync).
  const at::Tensor rows =
      ((offsets + lengths).unsqueeze(1) + at::arange(t, offsets.options())).reshape({segments * t});
  key_data.index_copy_(0, rows, key_states.reshape({segments * t, key_states.size(3)}).to(key_data.dtype()));
  value_data.index_copy_(0, rows, value_states.reshape({segments * t, value_states.size(3)}).to(value_data.dtype()));
  lengths.add_(t);
}

}  // namespace cspkv
