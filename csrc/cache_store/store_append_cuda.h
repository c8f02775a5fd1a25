// CUDA side of the decode append (cache_store.cpp), defined in
// store_append.cu: host declaration only, so the C++ compiler can include it.
#pragma once

#include <c10/core/Device.h>

#include "store_rows.h"

namespace cspkv {
namespace cuda {

// Writes the key and value rows and, when `live` is not null, the liveness
// rows into their stores on `device`: one kernel launch on the current stream.
// Keys and values have the same element size.
void copy_store_rows(c10::Device device, const StoreRows& keys, const StoreRows& values, const StoreRows* live);

}  // namespace cuda
}  // namespace cspkv
