// Small float32 vector primitives for attention and element-wise work, dispatched at
// run time like the matrix kernels (scalar / AVX2 / AVX-512).
#pragma once

#include <cstdint>

namespace moe {

struct VecOps {
  float (*dot)(const float* a, const float* b, int64_t n);
  // y += a * x
  void (*axpy)(float* y, float a, const float* x, int64_t n);
};

// The variant matching the active matrix-kernel ISA (see kernels.h).
const VecOps& vecops();

// Per-ISA tables; a variant is only called when the CPU supports it.
const VecOps& vecops_scalar();
const VecOps& vecops_avx2();
const VecOps& vecops_avx512();

}  // namespace moe
