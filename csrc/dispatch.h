// The project's one dtype dispatch: float, half and bfloat16, nothing else.
// (Modality ids are not dispatched: the bindings convert them to int32.)
#pragma once

#include <ATen/Dispatch.h>

#define CSPKV_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)
