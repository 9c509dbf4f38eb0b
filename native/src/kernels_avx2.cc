// AVX2 + FMA + F16C kernels: R rows x T tokens of accumulators, each weight block loaded
// once for all tokens of the tile, one 32-block per ymm. Q8_0: vpmaddubsw on |w| x (x with
// the sign of w), then vpmaddwd to int32 (no saturation: |w| <= 127, |x| <= 127); Q4_0: the
// unsigned nibbles times x, plus the -8 * sum(x) correction (see "Quantized" below).
// Decode (one token) streams its rows in 2-row tiles with a software prefetch ahead of
// them (see tiling_for), two blocks per iteration (q_tile_decode2: vector scales, and for
// Q8_0 |x| x (w with the sign of x), the same products); 6 tokens and more go in groups of
// 8 with tokens in lanes (q_tile_g8). Activations are quantized with AVX2 too, to the
// scalar bytes.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "kernels_simd.h"

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

// ---- Quantized (Q8_0 / Q4_0) ---------------------------------------------------------
//
// Per (row, token, 32-block) the integer dot product goes to 8 int32 lanes:
//   Q8_0: vpmaddwd(vpmaddubsw(|w|, x * sign(w)), 1)            (no saturation: |w| <= 127, |x| <= 127)
//   Q4_0: vpmaddwd(vpmaddubsw(nibble, x), 1) + corr in lane 0    (nibble 0..15 unsigned; corr =
//         -8 * sum(x) from prepare_acts makes it the product with nibble - 8)
// then acc += float(lanes) * (d_w * d_x), and one horizontal sum per (row, token) at the
// end of the row. Every kernel below does exactly this per (row, token), whatever its
// tiling, so a row's result does not depend on the batch it was computed in.

template <WType WT>
struct QW;

template <>
struct QW<WType::Q8_0> {
  static constexpr size_t kBytes = 34;
  struct V {
    __m256i abs;   // |w|
    __m256i sign;  // w, for vpsignb of the activations
  };
  static inline V load(const uint8_t* blk) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    return V{_mm256_sign_epi8(w, w), w};
  }
  static inline __m256i dot(const V& w, __m256i x, __m256i /*corr*/, __m256i ones16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w.abs, _mm256_sign_epi8(x, w.sign)), ones16);
  }
};

template <>
struct QW<WType::Q4_0> {
  static constexpr size_t kBytes = 18;
  struct V {
    __m256i nib;  // nibbles 0..15 in weight order
  };
  static inline V load(const uint8_t* blk) {
    // Both halves hold the 16 bytes; the high one shifted by 4: weights 0..15, then 16..31.
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    return V{_mm256_and_si256(_mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f))};
  }
  static inline __m256i dot(const V& w, __m256i x, __m256i corr, __m256i ones16) {
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w.nib, x), ones16), corr);
  }
};

inline __m256i corr_lane0(const int32_t* c) { return _mm256_castsi128_si256(_mm_cvtsi32_si128(*c)); }

// Prefetch distance of the tiles: ~2 KB ahead into L1 while a tile runs. Long rows take
// the same 2-row tiles: one row per tile prefetching 8 KB ahead into L2 (the AVX-512
// choice) was no faster for Q8_0 4096 x 14336 and slower for Q4_0 (two threads, paired
// runs: 11.9 against 16.8 GB/s). Float rows from kLongRowBytes on: see matmul_f.
constexpr size_t kTileAhead = 2048;
// Token groups (q_tile_g8): from this many tokens on (and a last partial group of this
// many), in tiles of kGroupRows rows. Two threads, paired runs against the per-token tiles:
// Q8_0 1536 x 2048 with 512 tokens 43 -> 64 GMAC/s, Q4_0 37 -> 79, 151936 x 2048 with 32
// tokens 43 -> 64; 8 tokens 4.0 -> 7.4 GB/s, 6 and 7 tokens 7.1 -> 9.0; 5 tokens (3 lanes
// of padding) 8.0 -> 5.6, so they stay per token. 2 or 4 rows per tile: same within noise.
constexpr int64_t kGroupMin = 6;
constexpr int kGroupRows = 3;
constexpr size_t kLongRowBytes = 6144;

template <WType WT, int R, int T>
void q_tile(const uint8_t* w0, size_t rb, int64_t nb, const QActs& a, int64_t cols, int64_t t0, float* y,
            int64_t ldy, int64_t r, Prefetch pf) {
  constexpr size_t BB = QW<WT>::kBytes;
  __m256 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int8_t* xq = a.q + t0 * cols;
  const float* xd = a.d + t0 * nb;
  const int32_t* xc = a.corr + t0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    pf.template upto<Hint::T0>(static_cast<size_t>(b + 1) * (R * BB));
    typename QW<WT>::V wv[R];
    float dw[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      wv[i] = QW<WT>::load(p);
      dw[i] = f16_at(p);
    }
    for (int t = 0; t < T; ++t) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * cols + b * 32));
      const float dx = xd[t * nb + b];
      const __m256i corr = WT == WType::Q4_0 ? corr_lane0(xc + t * nb + b) : _mm256_setzero_si256();
      for (int i = 0; i < R; ++i) {
        const __m256i s = QW<WT>::dot(wv[i], xv, corr, ones16);
        acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw[i] * dx), acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r + i] = hsum(acc[i][t]);
}

// The 32 weights of a Q8_0 block.
inline __m256i load_q8(const uint8_t* blk) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)); }

// The decode tile (one token, two rows), two blocks per iteration: the iteration's four
// f16 weight scales go through one vcvtph2ps and one vmulps with the token's two block
// scales, and each product is broadcast from a stack copy, instead of one scalar
// conversion, multiply and broadcast per (row, block). On a Zen 1 core (AVX2, 256-bit
// operations split in two) the per-block scale handling was the bulk of the decode tile's
// work after the integer dot product: in-cache, one thread, this tile runs 17-19% faster
// than q_tile<WT, 2, 1> (10.9-11.2 against 9.4 GB/s), 23-25% with Q8_0's |x| shared by
// the two rows (11.4-11.85). Per (row, block) it computes the same int32 lanes, the same
// float product of the two scales and the same FMA, in the same order, so its results are
// bitwise those of q_tile<WT, 2, 1>.
template <WType WT>
void q_tile_decode2(const uint8_t* w0, size_t rb, int64_t nb, const QActs& a, int64_t cols, int64_t t0, float* y, int64_t ldy,
                    int64_t r, Prefetch pf) {
  constexpr size_t BB = QW<WT>::kBytes;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int8_t* xq = a.q + t0 * cols;
  const float* xd = a.d + t0 * nb;
  const int32_t* xc = a.corr + t0 * nb;
  const uint8_t* w1 = w0 + rb;
  const auto scale_bits = [](const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return static_cast<int>(h);
  };
  alignas(16) float sc[4];
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    pf.template upto<Hint::T0>(static_cast<size_t>(b + 2) * (2 * BB));
    const uint8_t* p0 = w0 + b * BB;
    const uint8_t* p1 = w1 + b * BB;
    // Scales (row 0, block b), (row 1, b), (row 0, b + 1), (row 1, b + 1), times the
    // token's scales of blocks b, b, b + 1, b + 1.
    __m128i h = _mm_cvtsi32_si128(scale_bits(p0));
    h = _mm_insert_epi16(h, scale_bits(p1), 1);
    h = _mm_insert_epi16(h, scale_bits(p0 + BB), 2);
    h = _mm_insert_epi16(h, scale_bits(p1 + BB), 3);
    const __m128 dx = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xd + b)));
    _mm_store_ps(sc, _mm_mul_ps(_mm_cvtph_ps(h), _mm_unpacklo_ps(dx, dx)));
    for (int k = 0; k < 2; ++k) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (b + k) * 32));
      __m256i s0, s1;
      if constexpr (WT == WType::Q8_0) {
        // |x| once for both rows, the sign of x moved onto each row's weights: the same
        // products as |w| x (x with the sign of w), one vpsignb fewer per row and block.
        // Exact because no weight is -128 (see kernels.h: Q8_0).
        const __m256i ax = _mm256_sign_epi8(xv, xv);
        s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(load_q8(p0 + k * BB), xv)), ones16);
        s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(load_q8(p1 + k * BB), xv)), ones16);
      } else {
        const __m256i corr = corr_lane0(xc + b + k);
        s0 = QW<WT>::dot(QW<WT>::load(p0 + k * BB), xv, corr, ones16);
        s1 = QW<WT>::dot(QW<WT>::load(p1 + k * BB), xv, corr, ones16);
      }
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(sc + 2 * k), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_broadcast_ss(sc + 2 * k + 1), acc1);
    }
  }
  if (b < nb) {
    // An odd last block, as q_tile does it.
    pf.template upto<Hint::T0>(static_cast<size_t>(nb) * (2 * BB));
    const uint8_t* p0 = w0 + b * BB;
    const uint8_t* p1 = w1 + b * BB;
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
    const float dx = xd[b];
    const __m256i corr = WT == WType::Q4_0 ? corr_lane0(xc + b) : _mm256_setzero_si256();
    const __m256i s0 = QW<WT>::dot(QW<WT>::load(p0), xv, corr, ones16);
    const __m256i s1 = QW<WT>::dot(QW<WT>::load(p1), xv, corr, ones16);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(f16_at(p0) * dx), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(f16_at(p1) * dx), acc1);
  }
  y[t0 * ldy + r] = hsum(acc0);
  y[t0 * ldy + r + 1] = hsum(acc1);
}

// Tokens in lanes, for groups of 8 tokens (the activations' token-interleaved copy, see
// kernels.h): each 8-byte piece k of a weight block is broadcast to the four 64-bit lanes
// and multiplied with the same piece of four tokens' blocks, so one vpmaddubsw serves four
// tokens, and the int -> float scaling costs 3 instructions per (row, block, 4 tokens)
// instead of per token. A token's block dot product ends in two int32 lanes (positions
// 8k..8k+3 and 8k+4..8k+7 of every piece k), scaled and accumulated like the per-token
// tiles' eight; its output is the sum of its two float lanes at the end of the row.
template <WType WT, int R>
void q_tile_g8(const uint8_t* w0, size_t rb, int64_t nb, const uint8_t* grp, int64_t t0, int64_t n, float* y,
               int64_t ldy, int64_t r, Prefetch pf) {
  constexpr size_t BB = QW<WT>::kBytes;
  __m256 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    pf.template upto<Hint::T0>(static_cast<size_t>(b + 1) * (R * BB));
    const uint8_t* gb = grp + b * kGroupBlockBytes;
    const __m256 d_lo = _mm256_loadu_ps(reinterpret_cast<const float*>(gb + 256));
    const __m256 d_hi = _mm256_loadu_ps(reinterpret_cast<const float*>(gb + 288));
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      if constexpr (WT == WType::Q8_0) {
        for (int k = 0; k < 4; ++k) {
          int64_t q;
          std::memcpy(&q, p + 2 + 8 * k, 8);
          const __m256i wb = _mm256_set1_epi64x(q);
          const __m256i wa = _mm256_sign_epi8(wb, wb);
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * k));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * k + 32));
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(x0, wb)), ones16));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(x1, wb)), ones16));
        }
      } else {
        // Pieces 0, 1: low nibbles of bytes 0..7, 8..15 (weights 0..15); 2, 3: high nibbles.
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
        const __m128i m = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(q, m), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
        const __m128i piece[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
        // The four pieces' vpmaddubsw sums add up in int16 before one vpmaddwd: each is at
        // most 2 * 15 * 127 = 3810 in magnitude, four at most 15240 (no saturation), so the
        // int32 lanes are those of four vpmaddwd, with a quarter of them.
        __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
        for (int k = 0; k < 4; ++k) {
          const __m256i wb = _mm256_broadcastq_epi64(piece[k]);
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * k));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 64 * k + 32));
          m0 = _mm256_add_epi16(m0, _mm256_maddubs_epi16(wb, x0));
          m1 = _mm256_add_epi16(m1, _mm256_maddubs_epi16(wb, x1));
        }
        s0 = _mm256_add_epi32(_mm256_madd_epi16(m0, ones16), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 320)));
        s1 = _mm256_add_epi32(_mm256_madd_epi16(m1, ones16), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gb + 352)));
      }
      const __m256 dw = _mm256_set1_ps(f16_at(p));
      acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(dw, d_lo), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(dw, d_hi), acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int h = 0; h < 2; ++h) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[i][h]);
      for (int j = 0; j < 4; ++j) {
        const int64_t tok = t0 + 4 * h + j;
        if (tok < n) y[tok * ldy + r + i] = lanes[2 * j] + lanes[2 * j + 1];
      }
    }
  }
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
            int64_t r, Prefetch pf) {
  constexpr size_t WE = M == FMode::F32 ? 4 : 2;             // weight element bytes
  constexpr size_t XE = M == FMode::Bf16 ? 2 : 4;            // activation element bytes
  constexpr FMode XM = M == FMode::Bf16 ? FMode::Bf16 : FMode::F32;
  __m256 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_ps();
  const uint8_t* xs = xbase + static_cast<size_t>(t0 * cols) * XE;
  const int64_t full = cols / 8 * 8;
  for (int64_t c = 0; c < full; c += 8) {
    pf.template upto<Hint::T0>(static_cast<size_t>(c + 8) * WE * R);
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
// One token: 2-row tiles with the linear prefetch (two threads, from memory, paired runs
// in one process: 1536 x 2048 Q8_0 with 4-row tiles and no software prefetch 11.8 GB/s
// against a 21 GB/s probe; with 2-row tiles prefetching 2 KB ahead 15-17 GB/s against a
// 16-22 GB/s probe; 4 KB ahead, or 4-row tiles, no better within the noise).
inline Tiling tiling_for(int64_t n) {
  if (n == 1) return {2, 1};
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
  const uint8_t* end = w.data + r1 * rb;  // prefetches stop here: later rows are another call's
  const auto per_token = [&](int64_t t_begin, int64_t rb0, int64_t rb1, size_t ahead) {
    const int64_t nt = x.n - t_begin;
    const QActs shifted{a.q + t_begin * w.cols, a.d + t_begin * nb, a.corr + t_begin * nb, nullptr, nullptr};
    float* ys = y + t_begin * ldy;
    for_tiles(nt, rb0, rb1, [&](int R, int T, int64_t r, int64_t t0) {
      const uint8_t* w0 = w.data + r * rb;
      // Only the first token tile over these rows streams them from memory.
      const Prefetch pf(w0, static_cast<size_t>(R) * rb, t0 == 0 ? ahead : 0, end);
      if (R == 2 && T == 1) {
        q_tile_decode2<WT>(w0, rb, nb, shifted, w.cols, t0, ys, ldy, r, pf);
        return;
      }
#define MOE_Q(R_, T_) q_tile<WT, R_, T_>(w0, rb, nb, shifted, w.cols, t0, ys, ldy, r, pf)
      MOE_AVX2_DISPATCH(MOE_Q)
#undef MOE_Q
    });
  };
  // Groups of 8 tokens (a last partial group of kGroupMin or more too, its missing lanes
  // zero) go through q_tile_g8, the other tokens through the per-token tiles over the same
  // rows while they are cached.
  const int64_t grouped = x.n >= kGroupMin ? (x.n % 8 >= kGroupMin ? (x.n + 7) / 8 * 8 : x.n / 8 * 8) : 0;
  if (grouped == 0) {
    const size_t ahead = ahead_for(static_cast<size_t>(tiling_for(x.n).rows) * rb, kTileAhead);
    prefetch_start(w.data + r0 * rb, ahead, end);
    per_token(0, r0, r1, ahead);
    return;
  }
  constexpr int GR = kGroupRows;
  const size_t ahead = ahead_for(GR * rb, kTileAhead);
  prefetch_start(w.data + r0 * rb, ahead, end);
  const int64_t ng = std::min(grouped, x.n);
  for (int64_t r = r0; r < r1; r += GR) {
    const int R = static_cast<int>(std::min<int64_t>(GR, r1 - r));
    const uint8_t* w0 = w.data + r * rb;
    for (int64_t t0 = 0; t0 < grouped; t0 += 8) {
      const uint8_t* grp = a.groups + (t0 / 8) * nb * kGroupBlockBytes;
      // Only the first pass streams the rows from memory; the others find them cached.
      const Prefetch pf(w0, static_cast<size_t>(R) * rb, t0 == 0 ? ahead : 0, end);
      switch (R) {
        case 1: q_tile_g8<WT, 1>(w0, rb, nb, grp, t0, ng, y, ldy, r, pf); break;
        case 2: q_tile_g8<WT, 2>(w0, rb, nb, grp, t0, ng, y, ldy, r, pf); break;
        default: q_tile_g8<WT, GR>(w0, rb, nb, grp, t0, ng, y, ldy, r, pf); break;
      }
    }
    if (grouped < x.n) per_token(grouped, r, r + R, 0);
  }
}

template <FMode M>
void matmul_f(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  const uint8_t* end = w.data + r1 * rb;
  // One token streams like the quantized kernels, in 2-row tiles (tiling_for) with the tile
  // prefetch; several tokens are compute-bound. Rows of 6 KB or more (float32 router rows
  // of 2048, bf16 rows of 3072 columns and up) stream best in 4-row tiles without software
  // prefetch (two threads, paired runs: bf16 4096 x 14336 15.4 GB/s against 14.5 with
  // 2-row tiles and 12.8 one row per tile prefetching into L2; f32 128 x 2048 18.5
  // against 14.3; shorter rows gain from the 2-row tiles: bf16 2048 x 768 9.2 -> 16.4).
  if (x.n == 1 && rb >= kLongRowBytes) {
    const Prefetch none(w.data, 0, 0, end);
    for (int64_t r = r0; r < r1; r += 4) {
      const uint8_t* w0 = w.data + r * rb;
      switch (std::min<int64_t>(4, r1 - r)) {
        case 1: f_tile<M, 1, 1>(w0, rb, x.buf.data(), w.cols, 0, y, ldy, r, none); break;
        case 2: f_tile<M, 2, 1>(w0, rb, x.buf.data(), w.cols, 0, y, ldy, r, none); break;
        case 3: f_tile<M, 3, 1>(w0, rb, x.buf.data(), w.cols, 0, y, ldy, r, none); break;
        default: f_tile<M, 4, 1>(w0, rb, x.buf.data(), w.cols, 0, y, ldy, r, none); break;
      }
    }
    return;
  }
  const size_t ahead = x.n == 1 ? ahead_for(static_cast<size_t>(tiling_for(1).rows) * rb, kTileAhead) : 0;
  if (ahead > 0) prefetch_start(w.data + r0 * rb, ahead, end);
  for_tiles(x.n, r0, r1, [&](int R, int T, int64_t r, int64_t t0) {
    const uint8_t* w0 = w.data + r * rb;
    const Prefetch pf(w0, static_cast<size_t>(R) * rb, ahead, end);
#define MOE_F(R_, T_) f_tile<M, R_, T_>(w0, rb, x.buf.data(), w.cols, t0, y, ldy, r, pf)
    MOE_AVX2_DISPATCH(MOE_F)
#undef MOE_F
  });
}

}  // namespace

namespace {

// Same arithmetic as the AVX-512 quantize_acts_row (max |x|, 127 / amax, x * id rounded to
// nearest even, clamp), so the bytes are those of the scalar variant for finite inputs.
void quantize_acts_row(const float* x, int64_t nb, int8_t* q, float* d, int32_t* corr, int32_t mul) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nb; ++b) {
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 32 * b + 8 * k);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                   _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i iv[4];
    for (int k = 0; k < 4; ++k) iv[k] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[k], vid)), lo), hi);
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm256_permutevar8x32_epi32(p8, order));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    d[b] = amax / 127.0f;
    corr[b] = -mul * _mm_cvtsi128_si32(s4);
  }
}

}  // namespace

void prepare_avx2(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out) {
  if (t != WType::Q8_0 && t != WType::Q4_0) return prepare_scalar(t, x, n, cols, ldx, out);
  quantize_act_rows(t, x, n, cols, ldx, out, quantize_acts_row);
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

uint64_t int8_peak_avx2(int64_t iters, int64_t* macs) {
  // Four chains, each with its own operand; the empty asm makes the operands opaque every
  // round (no instruction), so no round can be folded or hoisted out of the loop. The
  // accumulators' dependency is one vpaddd per round: the probe is throughput-bound.
  __m256i acc[4], a[4];
  for (int c = 0; c < 4; ++c) {
    acc[c] = _mm256_set1_epi32(c);
    a[c] = _mm256_set1_epi8(static_cast<char>(3 + c));
  }
  const __m256i b = _mm256_set1_epi8(-5), ones16 = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]));
    for (int c = 0; c < 4; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(a[c], b), ones16));
  }
  const __m256i s = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  *macs = iters * 4 * 32;
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t int8_peak_q4_groups_avx2(int64_t iters, int64_t* macs) {
  // As int8_peak_avx2, in q_tile_g8's Q4_0 mix: per chain and round, four vpmaddubsw (each
  // its own operand pair: the nibble-sized a[c] and one of four b) summed with vpaddw,
  // then one vpmaddwd and one vpaddd: 128 MACs.
  __m256i acc[4], a[4], b[4];
  for (int c = 0; c < 4; ++c) {
    acc[c] = _mm256_set1_epi32(c);
    a[c] = _mm256_set1_epi8(static_cast<char>(3 + c));
    b[c] = _mm256_set1_epi8(static_cast<char>(-5 - c));
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]));
    for (int c = 0; c < 4; ++c) {
      __m256i m = _mm256_maddubs_epi16(a[c], b[0]);
      m = _mm256_add_epi16(m, _mm256_maddubs_epi16(a[c], b[1]));
      m = _mm256_add_epi16(m, _mm256_maddubs_epi16(a[c], b[2]));
      m = _mm256_add_epi16(m, _mm256_maddubs_epi16(a[c], b[3]));
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(m, ones16));
    }
  }
  const __m256i s = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  *macs = iters * 4 * 128;
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

}  // namespace kdetail
}  // namespace moe
