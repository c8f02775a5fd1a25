// Tensor-core building blocks (sm_80 and newer): asynchronous 16-byte copies
// from global to shared memory, ldmatrix fragment loads and the m16n8k16 MMA
// with float accumulators, for half and bfloat16 operands (raw 16-bit words:
// the kernels stay torch-free and pick the instruction with kBF16).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4, c = lane % 4:
//   A, 16 x 16 row-major:  a[0] = (row g, cols 2c, 2c+1)   a[1] = (row g+8, cols 2c, 2c+1)
//                          a[2] = (row g, cols 2c+8, 2c+9) a[3] = (row g+8, cols 2c+8, 2c+9)
//   B, 16 x 8 (k x n):     b[0] = (k 2c, 2c+1; n g)        b[1] = (k 2c+8, 2c+9; n g)
//   C, 16 x 8 float:       c[0], c[1] = (row g, cols 2c, 2c+1)   c[2], c[3] = (row g+8, cols 2c, 2c+1)
// B is read from a tile stored [n][k] (a key or query row per n, head dim
// along k), which is exactly the ".col" operand layout.
//
// Compiled for an older architecture these functions trap; the bindings only
// launch kernels built on them after checking the kernel's PTX version.
#pragma once

#include <cstdint>

namespace cspkv {
namespace cuda {
namespace mma {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define CSPKV_MMA_UNSUPPORTED 1
#endif

// Copies 16 bytes from global `src` to shared `dst`, or zero-fills `dst` when
// !valid (then `src` is not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef CSPKV_MMA_UNSUPPORTED
  __trap();
#else
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef CSPKV_MMA_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed copy groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef CSPKV_MMA_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Four 8x8 matrices of 16-bit words: lanes 8i..8i+7 give the row addresses of
// matrix i (16-byte aligned); r[i] receives this lane's pair of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* src) {
#ifdef CSPKV_MMA_UNSUPPORTED
  __trap();
#else
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(src));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
#endif
}

// d += a * b for one m16n8k16 tile; kBF16 picks bfloat16, else half operands.
template <bool kBF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef CSPKV_MMA_UNSUPPORTED
  __trap();
#else
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

#undef CSPKV_MMA_UNSUPPORTED

}  // namespace mma
}  // namespace cuda
}  // namespace cspkv
