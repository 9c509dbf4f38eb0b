#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "vecops.h"

namespace moe {

namespace {

float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

void axpy_avx2(float* y, float a, const float* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Lanes [0, n) set (n <= 8), for maskload / maskstore.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// e^x, as exp512 (vecops_avx512.cc), with 2^k built in the exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The first n (<= 8) of 8 cache elements from base + i, the others 0 (float32, or float16
// converted; `lanes` is lanes_below(n)).
template <bool F16>
inline __m256 load_kv256(const void* base, int64_t i, int64_t n, __m256i lanes) {
  if constexpr (F16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
    if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < n; j++) tmp[j] = p[j];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
  } else {
    // A full tile is a plain load: vmaskmovps costs several times as much on some CPUs.
    if (n == 8) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    return _mm256_maskload_ps(static_cast<const float*>(base) + i, lanes);
  }
}

// attend() for NQ query heads, as attend_heads512 (vecops_avx512.cc) in tiles of 8 positions.
template <int NQ, bool F16>
void attend_heads256(const AttnArgs& a, const float* Q, float* O) {
  const int64_t hd = a.head_dim, bs = a.block_size;
  constexpr int64_t kElem = F16 ? 2 : 4;
  float m[NQ], l[NQ], corr[NQ];
  alignas(32) float P[NQ][8];
  #pragma GCC unroll 16
  for (int h = 0; h < NQ; h++) {
    m[h] = -INFINITY;
    l[h] = 0.f;
  }
  std::fill(O, O + NQ * hd, 0.f);
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t p0 = 0; p0 < a.visible;) {
    const int64_t b = a.blocks[p0 / bs], i0 = p0 % bs;
    const int n = static_cast<int>(std::min<int64_t>(std::min<int64_t>(8, bs - i0), a.visible - p0));
    const __m256i mask = lanes_below(n);
    const int64_t kt = kv_key_index(b, a.g, i0, 0, a.kv_heads, hd, bs);
    const int64_t vb = kv_value_index(b, a.g, i0, 0, a.kv_heads, hd, bs);
    __m256 s[NQ];
    #pragma GCC unroll 16
    for (int h = 0; h < NQ; h++) s[h] = _mm256_setzero_ps();
    // The next tile's keys (one line per dimension) and values (contiguous) are prefetched
    // while this one runs: the cache of a long context streams from memory once per token
    // and layer, and the hardware prefetchers do not cross the 4 KB page boundaries.
    const uint8_t* next_k = nullptr;
    const uint8_t* next_v = nullptr;
    int64_t next_v_bytes = 0;
    if (p0 + n < a.visible) {
      const int64_t p1 = p0 + n, b1 = a.blocks[p1 / bs], i1 = p1 % bs;
      const int64_t n1 = std::min<int64_t>(std::min<int64_t>(8, bs - i1), a.visible - p1);
      next_k = static_cast<const uint8_t*>(a.keys) + kv_key_index(b1, a.g, i1, 0, a.kv_heads, hd, bs) * kElem;
      next_v = static_cast<const uint8_t*>(a.values) + kv_value_index(b1, a.g, i1, 0, a.kv_heads, hd, bs) * kElem;
      next_v_bytes = n1 * hd * kElem;
    }
    for (int64_t d = 0; d < hd; d++) {
      if (next_k != nullptr) {
        _mm_prefetch(reinterpret_cast<const char*>(next_k + d * bs * kElem), _MM_HINT_T1);
        if (d * 64 < next_v_bytes) _mm_prefetch(reinterpret_cast<const char*>(next_v + d * 64), _MM_HINT_T1);
      }
      const __m256 kv = load_kv256<F16>(a.keys, kt + d * bs, n, mask);
      #pragma GCC unroll 16
      for (int h = 0; h < NQ; h++) s[h] = _mm256_fmadd_ps(_mm256_set1_ps(Q[h * hd + d]), kv, s[h]);
    }
    const __m256 live = _mm256_castsi256_ps(mask);
    #pragma GCC unroll 16
    for (int h = 0; h < NQ; h++) {
      const __m256 sv = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(s[h], scale), live);
      const float mn = std::max(m[h], hmax256(sv));
      corr[h] = std::exp(m[h] - mn);  // 0 on the first tile (m = -inf)
      const __m256 pe = _mm256_and_ps(live, exp256(_mm256_sub_ps(sv, _mm256_set1_ps(mn))));
      l[h] = l[h] * corr[h] + hsum256(pe);
      _mm256_store_ps(P[h], pe);
      m[h] = mn;
    }
    for (int64_t c = 0; c < hd; c += 8) {
      const int64_t cn = std::min<int64_t>(8, hd - c);
      const __m256i cm = lanes_below(cn);
      __m256 acc[NQ];
      // Whole chunks (every chunk when head_dim is a multiple of 8) with plain loads and
      // stores; masked stores are slow on AMD CPUs (microcoded).
      #pragma GCC unroll 16
      for (int h = 0; h < NQ; h++) {
        const __m256 o = cn == 8 ? _mm256_loadu_ps(O + h * hd + c) : _mm256_maskload_ps(O + h * hd + c, cm);
        acc[h] = _mm256_mul_ps(o, _mm256_set1_ps(corr[h]));
      }
      for (int j = 0; j < n; j++) {
        const __m256 v = load_kv256<F16>(a.values, vb + j * hd + c, cn, cm);
        #pragma GCC unroll 16
        for (int h = 0; h < NQ; h++) acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(P[h][j]), v, acc[h]);
      }
      if (cn == 8) {
        #pragma GCC unroll 16
        for (int h = 0; h < NQ; h++) _mm256_storeu_ps(O + h * hd + c, acc[h]);
      } else {
        #pragma GCC unroll 16
        for (int h = 0; h < NQ; h++) _mm256_maskstore_ps(O + h * hd + c, cm, acc[h]);
      }
    }
    p0 += n;
  }
  #pragma GCC unroll 16
  for (int h = 0; h < NQ; h++) {
    const __m256 inv = _mm256_set1_ps(1.0f / l[h]);
    int64_t c = 0;
    for (; c + 8 <= hd; c += 8) _mm256_storeu_ps(O + h * hd + c, _mm256_mul_ps(_mm256_loadu_ps(O + h * hd + c), inv));
    if (c < hd) {
      const __m256i cm = lanes_below(hd - c);
      _mm256_maskstore_ps(O + h * hd + c, cm, _mm256_mul_ps(_mm256_maskload_ps(O + h * hd + c, cm), inv));
    }
  }
}

void silu_mul_avx2(float* out, const float* gate, const float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

double exp_weights_avx2(const float* x, int64_t n, float inv_t, double* out) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  float mx = hmax256(mv);
  for (; i < n; i++) mx = std::max(mx, x[i]);
  const __m256 vmx = _mm256_set1_ps(mx), vt = _mm256_set1_ps(inv_t);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 arg = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmx), vt);
    // Below e^-87.3 (exp256's floor) the weight is 0: a -inf logit stays impossible.
    const __m256 e = _mm256_and_ps(_mm256_cmp_ps(arg, _mm256_set1_ps(-87.3f), _CMP_GE_OQ), exp256(arg));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
    _mm256_storeu_pd(out + i, lo);
    _mm256_storeu_pd(out + i + 4, hi);
    s0 = _mm256_add_pd(s0, lo);
    s1 = _mm256_add_pd(s1, hi);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; i++) sum += out[i] = std::exp((x[i] - mx) * inv_t);
  return sum;
}

template <bool F16>
void attend_avx2_as(const AttnArgs& a) {
  // Up to 8 heads at once (a GQA group of 8 reads the cache once): their accumulators, the
  // loaded vector and a broadcast fit the 16 ymm registers.
  for (int64_t h0 = 0; h0 < a.nq; h0 += 8) {
    const float* q = a.q + h0 * a.head_dim;
    float* o = a.out + h0 * a.head_dim;
    switch (std::min<int64_t>(8, a.nq - h0)) {
      case 1: attend_heads256<1, F16>(a, q, o); break;
      case 2: attend_heads256<2, F16>(a, q, o); break;
      case 3: attend_heads256<3, F16>(a, q, o); break;
      case 4: attend_heads256<4, F16>(a, q, o); break;
      case 5: attend_heads256<5, F16>(a, q, o); break;
      case 6: attend_heads256<6, F16>(a, q, o); break;
      case 7: attend_heads256<7, F16>(a, q, o); break;
      default: attend_heads256<8, F16>(a, q, o); break;
    }
  }
}

void attend_avx2(const AttnArgs& a) {
  if (a.f16) attend_avx2_as<true>(a);
  else attend_avx2_as<false>(a);
}

}  // namespace

const VecOps& vecops_avx2() {
  static const VecOps ops{dot_avx2, axpy_avx2, attend_avx2, silu_mul_avx2, exp_weights_avx2};
  return ops;
}

}  // namespace moe
