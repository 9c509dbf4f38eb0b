#include "vecops.h"

#include "kernels.h"

namespace moe {

namespace {

float dot_scalar(const float* a, const float* b, int64_t n) {
  // Four partial sums: the same association as the SIMD variants' lanes would not be
  // reproducible anyway; this keeps the scalar path reasonably fast and accurate.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += static_cast<double>(a[i]) * b[i];
    s1 += static_cast<double>(a[i + 1]) * b[i + 1];
    s2 += static_cast<double>(a[i + 2]) * b[i + 2];
    s3 += static_cast<double>(a[i + 3]) * b[i + 3];
  }
  for (; i < n; i++) s0 += static_cast<double>(a[i]) * b[i];
  return static_cast<float>((s0 + s1) + (s2 + s3));
}

void axpy_scalar(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

}  // namespace

const VecOps& vecops_scalar() {
  static const VecOps ops{dot_scalar, axpy_scalar};
  return ops;
}

const VecOps& vecops() {
  switch (active_isa()) {
    case Isa::Avx512:
      return vecops_avx512();
    case Isa::Avx2:
      return vecops_avx2();
    default:
      return vecops_scalar();
  }
}

}  // namespace moe
