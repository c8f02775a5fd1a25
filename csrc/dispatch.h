// The project's one dtype dispatch: float, half and bfloat16, nothing else
// (the argument checks reject every other dtype, so no double instantiations).
// Modality ids are not dispatched: the bindings convert them to int32.
#pragma once

#include <ATen/Dispatch.h>

#define CSPKV_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
