// AVX2 + FMA + F16C kernels. Same tiling as the AVX-512 file (R rows x T tokens of
// accumulators, each weight block loaded once for all tokens of the tile) with one
// 32-block per ymm. Q8_0 / Q4_0: vpmaddubsw on |w| x (x with the sign of w), then
// vpmaddwd to int32 (no saturation: |w| <= 128, |x| <= 127); Q4_0 nibbles are made
// signed (n - 8) first. Activation preparation is the scalar one (a small share of a call).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace moe {
namespace kdetail {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

template <WType WT>
inline __m256i load_signed(const uint8_t* blk) {
  if constexpr (WT == WType::Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m256i nib = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(q, m)),
                                                _mm_and_si128(_mm_srli_epi16(q, 4), m), 1);
    return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
  }
}

template <WType WT, int R, int T>
void q_tile(const uint8_t* w0, size_t rb, int64_t nb, const QActs& a, int64_t cols, int64_t t0, float* y,
            int64_t ldy, int64_t r) {
  constexpr size_t BB = WT == WType::Q8_0 ? 34 : 18;
  __m256 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int8_t* xq = a.q + t0 * cols;
  const float* xd = a.d + t0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wv[R], wa[R];
    float dw[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      wv[i] = load_signed<WT>(p);
      wa[i] = _mm256_sign_epi8(wv[i], wv[i]);
      dw[i] = f16_at(p);
    }
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * cols + b * 32));
      const float dx = xd[t * nb + b];
      for (int i = 0; i < R; ++i) {
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], _mm256_sign_epi8(xv, wv[i])), ones16);
        acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw[i] * dx), acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r + i] = hsum(acc[i][t]);
}

enum class FMode { F32, F16, Bf16 };

template <FMode M>
inline __m256 load8(const uint8_t* p) {
  if constexpr (M == FMode::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  if constexpr (M == FMode::F16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <FMode M, int R, int T>
void f_tile(const uint8_t* w0, size_t rb, const uint8_t* xbase, int64_t cols, int64_t t0, float* y, int64_t ldy,
            int64_t r) {
  constexpr size_t WE = M == FMode::F32 ? 4 : 2;             // weight element bytes
  constexpr size_t XE = M == FMode::Bf16 ? 2 : 4;            // activation element bytes
  constexpr FMode XM = M == FMode::Bf16 ? FMode::Bf16 : FMode::F32;
  __m256 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_ps();
  const uint8_t* xs = xbase + static_cast<size_t>(t0 * cols) * XE;
  const int64_t full = cols / 8 * 8;
  for (int64_t c = 0; c < full; c += 8) {
    __m256 wv[R];
    for (int i = 0; i < R; ++i) wv[i] = load8<M>(w0 + i * rb + c * WE);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = load8<XM>(xs + (t * cols + c) * XE);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  if (full < cols) {
    // Tail of < 8 columns: through zero-padded copies (never reads past a row).
    const size_t left = static_cast<size_t>(cols - full);
    alignas(32) uint8_t wpad[R][32] = {};
    alignas(32) uint8_t xpad[32] = {};
    __m256 wv[R];
    for (int i = 0; i < R; ++i) {
      std::memcpy(wpad[i], w0 + i * rb + full * WE, left * WE);
      wv[i] = load8<M>(wpad[i]);
    }
    for (int t = 0; t < T; ++t) {
      std::memcpy(xpad, xs + (t * cols + full) * XE, left * XE);
      const __m256 xv = load8<XM>(xpad);
      for (int i = 0; i < R; ++i) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r + i] = hsum(acc[i][t]);
}

// 16 ymm registers: R x T <= 8 accumulators.
struct Tiling {
  int rows;
  int tokens;
};
inline Tiling tiling_for(int64_t n) {
  if (n == 1) return {4, 1};
  if (n == 2) return {4, 2};
  return {2, n < 4 ? static_cast<int>(n) : 4};
}

template <typename Run>
void for_tiles(int64_t n, int64_t r0, int64_t r1, const Run& run) {
  const Tiling tl = tiling_for(n);
  for (int64_t r = r0; r < r1; r += tl.rows) {
    const int R = static_cast<int>(r1 - r < tl.rows ? r1 - r : tl.rows);
    for (int64_t t0 = 0; t0 < n; t0 += tl.tokens) {
      const int T = static_cast<int>(n - t0 < tl.tokens ? n - t0 : tl.tokens);
      run(R, T, r, t0);
    }
  }
}

// Run-time (R in 1..4, T in 1..4) -> template instance.
#define MOE_AVX2_DISPATCH(CALL)                 \
  switch (R * 8 + T) {                          \
    case 9: CALL(1, 1); break;                  \
    case 10: CALL(1, 2); break;                 \
    case 11: CALL(1, 3); break;                 \
    case 12: CALL(1, 4); break;                 \
    case 17: CALL(2, 1); break;                 \
    case 18: CALL(2, 2); break;                 \
    case 19: CALL(2, 3); break;                 \
    case 20: CALL(2, 4); break;                 \
    case 25: CALL(3, 1); break;                 \
    case 26: CALL(3, 2); break;                 \
    case 33: CALL(4, 1); break;                 \
    default: CALL(4, 2); break;                 \
  }

template <WType WT>
void matmul_q(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  const int64_t nb = w.cols / 32;
  const QActs a = qacts(x);
  for_tiles(x.n, r0, r1, [&](int R, int T, int64_t r, int64_t t0) {
    const uint8_t* w0 = w.data + r * rb;
#define MOE_Q(R_, T_) q_tile<WT, R_, T_>(w0, rb, nb, a, w.cols, t0, y, ldy, r)
    MOE_AVX2_DISPATCH(MOE_Q)
#undef MOE_Q
  });
}

template <FMode M>
void matmul_f(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  for_tiles(x.n, r0, r1, [&](int R, int T, int64_t r, int64_t t0) {
    const uint8_t* w0 = w.data + r * rb;
#define MOE_F(R_, T_) f_tile<M, R_, T_>(w0, rb, x.buf.data(), w.cols, t0, y, ldy, r)
    MOE_AVX2_DISPATCH(MOE_F)
#undef MOE_F
  });
}

}  // namespace

void prepare_avx2(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out) {
  prepare_scalar(t, x, n, cols, ldx, out);
}

void matmul_avx2(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (w.type) {
    case WType::Q8_0: matmul_q<WType::Q8_0>(w, x, r0, r1, y, ldy); return;
    case WType::Q4_0: matmul_q<WType::Q4_0>(w, x, r0, r1, y, ldy); return;
    case WType::BF16: matmul_f<FMode::Bf16>(w, x, r0, r1, y, ldy); return;
    case WType::F16: matmul_f<FMode::F16>(w, x, r0, r1, y, ldy); return;
    case WType::F32: matmul_f<FMode::F32>(w, x, r0, r1, y, ldy); return;
  }
}

uint64_t stream_avx2(const uint8_t* p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  uint64_t out = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < bytes; ++i) out += p[i];
  return out;
}

}  // namespace kdetail
}  // namespace moe
