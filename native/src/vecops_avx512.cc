// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*()
// placeholders (GCC bug 105593, fixed in 13); nothing of ours is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "vecops.h"

namespace moe {

namespace {

float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void axpy_avx512(float* y, float a, const float* x, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// e^x: x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two for the reduction), Taylor to
// r^6 for e^r (truncation below 2e-7 relative) and 2^k by vscalefps. x is clamped to
// [-87.3, 88.3] (callers mask the lanes that must be 0).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}

// Lanes m of 16 cache elements from base + i (float32, or float16 converted).
template <bool F16>
inline __m512 load_kv512(const void* base, int64_t i, __mmask16 m) {
  if constexpr (F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i));
  else return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
}

// attend() for NQ query heads: one pass over the positions in tiles of up to 16 (never
// across a block boundary), online softmax (running max and sum per head; the output
// rows are rescaled when the max grows). A tile's scores are one vector per head: the
// keys of a block are stored transposed, so dimension d of the tile's 16 positions is
// one load, multiplied with q[h][d] broadcast, for every head at once.
template <int NQ, bool F16>
void attend_heads512(const AttnArgs& a, const float* Q, float* O) {
  const int64_t hd = a.head_dim, bs = a.block_size;
  constexpr int64_t kElem = F16 ? 2 : 4;
  float m[NQ], l[NQ], corr[NQ];
  alignas(64) float P[NQ][16];
  #pragma GCC unroll 16
  for (int h = 0; h < NQ; h++) {
    m[h] = -INFINITY;
    l[h] = 0.f;
  }
  std::fill(O, O + NQ * hd, 0.f);
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t p0 = 0; p0 < a.visible;) {
    const int64_t b = a.blocks[p0 / bs], i0 = p0 % bs;
    const int n = static_cast<int>(std::min<int64_t>(std::min<int64_t>(16, bs - i0), a.visible - p0));
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const int64_t kt = kv_key_index(b, a.g, i0, 0, a.kv_heads, hd, bs);
    const int64_t vb = kv_value_index(b, a.g, i0, 0, a.kv_heads, hd, bs);
    __m512 s[NQ];
    #pragma GCC unroll 16
    for (int h = 0; h < NQ; h++) s[h] = _mm512_setzero_ps();
    // The next tile's keys (one line per dimension) and values (contiguous) are prefetched
    // while this one runs: the cache of a long context streams from memory once per token
    // and layer, and the hardware prefetchers do not cross the 4 KB page boundaries.
    const uint8_t* next_k = nullptr;
    const uint8_t* next_v = nullptr;
    int64_t next_v_bytes = 0;
    if (p0 + n < a.visible) {
      const int64_t p1 = p0 + n, b1 = a.blocks[p1 / bs], i1 = p1 % bs;
      const int64_t n1 = std::min<int64_t>(std::min<int64_t>(16, bs - i1), a.visible - p1);
      next_k = static_cast<const uint8_t*>(a.keys) + kv_key_index(b1, a.g, i1, 0, a.kv_heads, hd, bs) * kElem;
      next_v = static_cast<const uint8_t*>(a.values) + kv_value_index(b1, a.g, i1, 0, a.kv_heads, hd, bs) * kElem;
      next_v_bytes = n1 * hd * kElem;
    }
    for (int64_t d = 0; d < hd; d++) {
      if (next_k != nullptr) {
        _mm_prefetch(reinterpret_cast<const char*>(next_k + d * bs * kElem), _MM_HINT_T1);
        if (d * 64 < next_v_bytes) _mm_prefetch(reinterpret_cast<const char*>(next_v + d * 64), _MM_HINT_T1);
      }
      const __m512 kv = load_kv512<F16>(a.keys, kt + d * bs, mask);
      #pragma GCC unroll 16
      for (int h = 0; h < NQ; h++) s[h] = _mm512_fmadd_ps(_mm512_set1_ps(Q[h * hd + d]), kv, s[h]);
    }
    #pragma GCC unroll 16
    for (int h = 0; h < NQ; h++) {
      const __m512 sv = _mm512_mask_blend_ps(mask, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(s[h], scale));
      const float mn = std::max(m[h], _mm512_reduce_max_ps(sv));
      corr[h] = std::exp(m[h] - mn);  // 0 on the first tile (m = -inf)
      const __m512 pe = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mn))));
      l[h] = l[h] * corr[h] + _mm512_reduce_add_ps(pe);
      _mm512_store_ps(P[h], pe);
      m[h] = mn;
    }
    for (int64_t c = 0; c < hd; c += 16) {
      const __mmask16 cm = hd - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (hd - c)) - 1);
      __m512 acc[NQ];
      #pragma GCC unroll 16
      for (int h = 0; h < NQ; h++) acc[h] = _mm512_mul_ps(_mm512_maskz_loadu_ps(cm, O + h * hd + c), _mm512_set1_ps(corr[h]));
      for (int j = 0; j < n; j++) {
        const __m512 v = load_kv512<F16>(a.values, vb + j * hd + c, cm);
        #pragma GCC unroll 16
        for (int h = 0; h < NQ; h++) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(P[h][j]), v, acc[h]);
      }
      #pragma GCC unroll 16
      for (int h = 0; h < NQ; h++) _mm512_mask_storeu_ps(O + h * hd + c, cm, acc[h]);
    }
    p0 += n;
  }
  #pragma GCC unroll 16
  for (int h = 0; h < NQ; h++) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[h]);
    for (int64_t c = 0; c < hd; c += 16) {
      const __mmask16 cm = hd - c >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (hd - c)) - 1);
      _mm512_mask_storeu_ps(O + h * hd + c, cm, _mm512_mul_ps(_mm512_maskz_loadu_ps(cm, O + h * hd + c), inv));
    }
  }
}

void silu_mul_avx512(float* out, const float* gate, const float* up, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

double exp_weights_avx512(const float* x, int64_t n, float inv_t, double* out) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
  float mx = _mm512_reduce_max_ps(mv);
  for (; i < n; i++) mx = std::max(mx, x[i]);
  const __m512 vmx = _mm512_set1_ps(mx), vt = _mm512_set1_ps(inv_t);
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 arg = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmx), vt);
    // Below e^-87.3 (exp512's floor) the weight is 0: a -inf logit stays impossible.
    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(arg, _mm512_set1_ps(-87.3f), _CMP_GE_OQ), exp512(arg));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    _mm512_storeu_pd(out + i, lo);
    _mm512_storeu_pd(out + i + 8, hi);
    s0 = _mm512_add_pd(s0, lo);
    s1 = _mm512_add_pd(s1, hi);
  }
  double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (; i < n; i++) sum += out[i] = std::exp((x[i] - mx) * inv_t);
  return sum;
}

template <bool F16>
void attend_avx512_as(const AttnArgs& a) {
  for (int64_t h0 = 0; h0 < a.nq; h0 += 8) {
    const float* q = a.q + h0 * a.head_dim;
    float* o = a.out + h0 * a.head_dim;
    switch (std::min<int64_t>(8, a.nq - h0)) {
      case 1: attend_heads512<1, F16>(a, q, o); break;
      case 2: attend_heads512<2, F16>(a, q, o); break;
      case 3: attend_heads512<3, F16>(a, q, o); break;
      case 4: attend_heads512<4, F16>(a, q, o); break;
      case 5: attend_heads512<5, F16>(a, q, o); break;
      case 6: attend_heads512<6, F16>(a, q, o); break;
      case 7: attend_heads512<7, F16>(a, q, o); break;
      default: attend_heads512<8, F16>(a, q, o); break;
    }
  }
}

void attend_avx512(const AttnArgs& a) {
  if (a.f16) attend_avx512_as<true>(a);
  else attend_avx512_as<false>(a);
}

}  // namespace

const VecOps& vecops_avx512() {
  static const VecOps ops{dot_avx512, axpy_avx512, attend_avx512, silu_mul_avx512, exp_weights_avx512};
  return ops;
}

}  // namespace moe
