#include "vecops.h"

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

void silu_mul_scalar(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

double exp_weights_scalar(const float* x, int64_t n, float inv_t, double* out) {
  float mx = x[0];
  for (int64_t i = 1; i < n; i++) mx = std::max(mx, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; i++) sum += out[i] = std::exp((x[i] - mx) * inv_t);
  return sum;
}

}  // namespace

namespace {

inline float kv_at(const void* base, int64_t i, bool f16) {
  return f16 ? f16_to_f32(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

}  // namespace

void attend_scalar(const AttnArgs& a) {
  const int64_t hd = a.head_dim, bs = a.block_size;
  thread_local std::vector<float> sc;
  sc.resize(static_cast<size_t>(a.visible));
  for (int64_t h = 0; h < a.nq; h++) {
    const float* q = a.q + h * hd;
    float* out = a.out + h * hd;
    float mx = -INFINITY;
    for (int64_t p = 0; p < a.visible; p++) {
      const int64_t b = a.blocks[p / bs], i = p % bs;
      const int64_t k = kv_key_index(b, a.g, i, 0, a.kv_heads, hd, bs);
      double s = 0;
      for (int64_t d = 0; d < hd; d++) s += static_cast<double>(q[d]) * kv_at(a.keys, k + d * bs, a.f16);
      sc[static_cast<size_t>(p)] = static_cast<float>(s) * a.scale;
      mx = std::max(mx, sc[static_cast<size_t>(p)]);
    }
    double sum = 0;
    for (int64_t p = 0; p < a.visible; p++) {
      const float e = std::exp(sc[static_cast<size_t>(p)] - mx);
      sc[static_cast<size_t>(p)] = e;
      sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t d = 0; d < hd; d++) out[d] = 0.f;
    for (int64_t p = 0; p < a.visible; p++) {
      const int64_t b = a.blocks[p / bs], i = p % bs;
      const int64_t v = kv_value_index(b, a.g, i, 0, a.kv_heads, hd, bs);
      const float w = sc[static_cast<size_t>(p)] * inv;
      for (int64_t d = 0; d < hd; d++) out[d] += w * kv_at(a.values, v + d, a.f16);
    }
  }
}

const VecOps& vecops_scalar() {
  static const VecOps ops{dot_scalar, axpy_scalar, attend_scalar, silu_mul_scalar, exp_weights_scalar};
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
