// AVX-512 kernels (F/BW/VL/DQ), with VNNI (vpdpbusd) for Q8_0 / Q4_0 and AVX512_BF16
// (vdpbf16ps) for BF16 when the CPU has them, checked at run time: this file is compiled
// with those extensions enabled, so the paths for CPUs without them are written with
// explicit intrinsics (never auto-vectorised loops) and only the VNNI / BF16 templates
// contain the newer instructions.
//
// Strategy (decode is memory-bound, prefill compute-bound):
// - A tile is R rows x T tokens of zmm accumulators. Each weight block is loaded and
//   unpacked once and multiplied with all T token vectors; tokens beyond T are served
//   by the next tile over the same rows, re-reading those rows from L1, so the matrix
//   is streamed from memory once whatever n is.
// - Q8_0 / Q4_0 take two 32-blocks per zmm. With VNNI the unsigned operand is the weight
//   (Q8_0: q + 128, i.e. q ^ 0x80; Q4_0: the raw nibble 0..15) and the signed one the
//   int8 activation; the accumulator starts from the per-(token, block) correction
//   -128 * sum(x) (resp. -8 * sum(x)) precomputed by prepare_acts, so the int32 result is
//   the exact signed dot product. Without VNNI: vpmaddubsw/vpmaddwd (Q8_0 with the
//   |w| x sign(w)*x trick so nothing saturates).
// - Per block: int32 partial sums -> float, times d_w * d_x, fused-added into the tile;
//   one horizontal reduction per (row, token) at the end of the row.
// - With VNNI, groups of 8 tokens use q_tile_g8 instead (tokens in lanes, weights
//   broadcast; see there), which removes most of the per-token float work; it serves
//   decode with 5..8 tokens and prefill in groups of 8.
// - Weight prefetch (see Prefetch): a tile's rows are contiguous bytes; while a tile runs
//   it prefetches, line by line and spread over its blocks, the region a few KB further on
//   (the next tile(s)), in ascending order, never past the call's last row. Measured on
//   Zen 4 with one thread streaming from memory: 2-row tiles with this linear prefetch
//   read ~2x faster than 4-row tiles prefetching each row's next-tile line, whose
//   interleaved streams the hardware prefetchers follow poorly.
// - Q8_0 with VNNI and 32 tokens or more (batched decode's LM head and attention
//   projections, prefill) takes pairs of 16-token groups through q8_tile_g16 (one lane per
//   token, see there), the rest through q_tile_g8.
// - Q8_0 with VNNI and 2..7 tokens (batched decode: a few tokens per expert) uses
//   q8_rows8 instead: 8 rows in lanes, see there.
// - Decode with one token (q_n1) is its own kernel: 2 rows per tile (1 row per tile for
//   Q8_0, with a non-temporal prefetch 8 KB ahead in the row's own stream, and for Q4_0
//   rows of 6 KB or more, into L2; see matmul_q), and each pair of blocks converts the
//   f16 scales of both rows with one vcvtph2ps and multiplies them by the activation
//   scales in one xmm before spreading them over the lanes. One-row tiles take four
//   blocks per iteration, their four scales gathered from the loaded bytes by one
//   vpermt2w.
// - F32 / F16 / BF16 with one or two tokens stream the same way (matmul_f).
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*()
// placeholders (GCC bug 105593, fixed in 13); nothing of ours is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "kernels.h"
#include "kernels_simd.h"

namespace moe {
namespace kdetail {
namespace {

// ---- Quantized (Q8_0 / Q4_0) --------------------------------------------------------

enum class QMode { Vnni, Plain };

// Lane i of the result = lane (i / 8) of v's low 64 bits: [v0 x8 | v1 x8].
inline __m512i idx_pair() { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }

template <WType WT>
struct QBlk;

template <>
struct QBlk<WType::Q8_0> {
  static constexpr size_t kBytes = 34;
  // 64 signed weights of blocks b, b+1 (b+1 zero when `one`).
  static inline __m512i load(const uint8_t* p, bool one) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    if (one) return _mm512_zextsi256_si512(lo);
    return _mm512_inserti64x4(_mm512_zextsi256_si512(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 36)), 1);
  }
};

template <>
struct QBlk<WType::Q4_0> {
  static constexpr size_t kBytes = 18;
  // 64 nibbles 0..15 of blocks b, b+1 in weight order (b+1 zero when `one`).
  static inline __m512i load(const uint8_t* p, bool one) {
    // [q0, q0, q1, q1] (two 128-bit broadcast loads and one 256-bit insert): lanes 0/2 take
    // the low nibbles (weights 0..15), 1/3 the high ones (shifted by 4 there only).
    const __m256i b0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
    const __m256i b1 = one ? _mm256_setzero_si256() : _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4), _mm512_set1_epi8(0x0f));
  }
};

inline __m512 scale_pair_f16(const uint8_t* p0, const uint8_t* p1) {
  uint16_t h0, h1 = 0;
  std::memcpy(&h0, p0, 2);
  if (p1 != nullptr) std::memcpy(&h1, p1, 2);
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (static_cast<uint32_t>(h1) << 16))));
  return _mm512_permutexvar_ps(idx_pair(), _mm512_zextps128_ps512(f));
}

// ---- Quantized tiles ------------------------------------------------------------------

// Prefetch hint and distance of the per-token tiles: T0 for 1-2 tokens (2-row tiles,
// ~4 KB ahead); with more tokens per tile (more work per byte) NTA, ~8 KB ahead.
template <int T>
constexpr Hint tile_hint() {
  return T <= 2 ? Hint::T0 : Hint::Nta;
}
inline size_t tile_ahead_target(int64_t tokens) { return tokens <= 2 ? 4096 : 8192; }
// Rows of at least kLongRowBytes go one row per tile, prefetching kLongRowAhead bytes ahead
// into L2 in the row's own stream (one-token matmuls, and two-token F32/F16/BF16 ones keep
// 2-row tiles only below it; measured in matmul_q and matmul_f).
constexpr size_t kLongRowBytes = 6144;
constexpr size_t kLongRowAhead = 8192;

template <WType WT, QMode M, int R, int T>
void q_tile(const uint8_t* w0, size_t rb, int64_t nb, const QActs& a, int64_t cols, int64_t t0, float* y,
            int64_t ldy, int64_t r, Prefetch pf) {
  constexpr size_t BB = QBlk<WT>::kBytes;
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const __m512i idx = idx_pair();
  const __m512i ones16 = _mm512_set1_epi16(1);
  const int8_t* xq = a.q + t0 * cols;
  const float* xd = a.d + t0 * nb;
  const int32_t* xc = a.corr + t0 * nb;

  for (int64_t b = 0; b < nb; b += 2) {
    const bool one = b + 1 == nb;
    pf.template upto<tile_hint<T>()>(static_cast<size_t>(b + 2) * (R * BB));
    __m512i wv[R];
    __m512 dw[R];
    __mmask64 neg[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      __m512i v = QBlk<WT>::load(p, one);
      dw[i] = scale_pair_f16(p, one ? nullptr : p + BB);
      if constexpr (WT == WType::Q8_0) {
        if constexpr (M == QMode::Vnni) {
          v = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));  // q + 128, unsigned
        } else {
          neg[i] = _mm512_movepi8_mask(v);
          v = _mm512_abs_epi8(v);  // |q| as unsigned (|-128| = 128 still fits)
        }
      }
      wv[i] = v;
    }
    (void)neg;
    for (int t = 0; t < T; ++t) {
      const int8_t* xp = xq + t * cols + b * 32;
      const __m512i xv = one ? _mm512_maskz_loadu_epi8(0xffffffffull, xp) : _mm512_loadu_si512(xp);
      const float* dp = xd + t * nb + b;
      const int32_t* cp = xc + t * nb + b;
      __m128 d2;
      __m128i c2;
      if (one) {
        d2 = _mm_load_ss(dp);
        c2 = _mm_cvtsi32_si128(cp[0]);
      } else {
        d2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dp)));
        c2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp));
      }
      const __m512 dx = _mm512_permutexvar_ps(idx, _mm512_zextps128_ps512(d2));
      // Corrections land in lane 0 (block b) and lane 8 (block b+1); they add up with
      // the other partial sums in the final reduction.
      const __m512i corr = (WT == WType::Q8_0 && M == QMode::Plain)
                               ? _mm512_setzero_si512()
                               : _mm512_maskz_permutexvar_epi32(0x0101, idx, _mm512_zextsi128_si512(c2));
      for (int i = 0; i < R; ++i) {
        __m512i s;
        if constexpr (M == QMode::Vnni) {
          s = _mm512_dpbusd_epi32(corr, wv[i], xv);
        } else if constexpr (WT == WType::Q8_0) {
          const __m512i xs = _mm512_mask_sub_epi8(xv, neg[i], _mm512_setzero_si512(), xv);
          s = _mm512_madd_epi16(_mm512_maddubs_epi16(wv[i], xs), ones16);
        } else {
          s = _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(wv[i], xv), ones16), corr);
        }
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw[i], dx), acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// One token, VNNI: the same arithmetic per row as q_tile<.., R, 1> (so results do not
// depend on which kernel or tile size served a row), fewer instructions per block pair:
// the scales d_w(b), d_w(b+1) of two rows are converted by one vcvtph2ps and multiplied by
// d_x(b), d_x(b+1) in one xmm, then spread over each row's two 8-lane halves.
template <WType WT, int R, Hint H = Hint::T0>
void q_n1(const uint8_t* w0, size_t rb, int64_t nb, const QActs& a, float* y, Prefetch pf) {
  constexpr size_t BB = QBlk<WT>::kBytes;
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i idx = idx_pair();
  const __m512i idx_hi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const int64_t nb2 = nb & ~int64_t{1};
  const int64_t nb4 = nb & ~int64_t{3};
  int64_t b0 = 0;
  if constexpr (R == 1) {
    // Four blocks per iteration: their f16 scales are words 0, BB/2, BB, 3BB/2 of the 64-byte
    // loads at the group's start (and 64 bytes on, Q8_0), gathered by one vpermt2w (Q4_0's
    // 72-byte group: one vpermw, nothing read past the group), converted and multiplied by
    // d_x(b..b+3) in one xmm; the two block pairs then run as below, in the same order, so
    // results stay those of the two-block loop (and of q_tile). One thread, 768 x 2048 in
    // cache: 34-36 -> 44 GB/s, what the 2-row tiles reach (from memory, two threads: the
    // same within noise; the compute it frees is for the other thread and the prefetches).
    constexpr int hw = static_cast<int>(BB / 2);
    const __m512i sidx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          3 * hw, 2 * hw, hw, 0);
    for (; b0 < nb4; b0 += 4) {
      pf.upto<H>(static_cast<size_t>(b0 + 4) * BB);
      const uint8_t* p = w0 + b0 * BB;
      const __m512i lo = _mm512_loadu_si512(p);
      __m512i h4;
      if constexpr (WT == WType::Q8_0) h4 = _mm512_permutex2var_epi16(lo, sidx, _mm512_loadu_si512(p + 64));
      else h4 = _mm512_permutexvar_epi16(sidx, lo);
      const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm512_castsi512_si128(h4)), _mm_loadu_ps(a.d + b0));
      const __m128i c4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.corr + b0));
      for (int h = 0; h < 2; ++h) {
        const int64_t b = b0 + 2 * h;
        const __m512i ix = h == 0 ? idx : idx_hi;
        const __m512i xv = _mm512_loadu_si512(a.q + b * 32);
        const __m512i corr = _mm512_maskz_permutexvar_epi32(0x0101, ix, _mm512_castsi128_si512(c4));
        const __m512 sc = _mm512_permutexvar_ps(ix, _mm512_castps128_ps512(f));
        __m512i v = QBlk<WT>::load(p + 2 * h * BB, false);
        if constexpr (WT == WType::Q8_0) v = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, v, xv)), sc, acc[0]);
      }
    }
  }
  for (int64_t b = b0; b < nb2; b += 2) {
    pf.upto<H>(static_cast<size_t>(b + 2) * (R * BB));
    const __m512i xv = _mm512_loadu_si512(a.q + b * 32);
    const __m128 d2 = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a.d + b)));
    const __m512i corr = _mm512_maskz_permutexvar_epi32(
        0x0101, idx, _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.corr + b))));
    __m512 sc[R];
    for (int i = 0; i + 1 < R; i += 2) {
      const uint8_t* p = w0 + i * rb + b * BB;
      uint16_t h0, h1, h2, h3;
      std::memcpy(&h0, p, 2);
      std::memcpy(&h1, p + BB, 2);
      std::memcpy(&h2, p + rb, 2);
      std::memcpy(&h3, p + rb + BB, 2);
      const uint64_t hh = h0 | (static_cast<uint64_t>(h1) << 16) | (static_cast<uint64_t>(h2) << 32) |
                          (static_cast<uint64_t>(h3) << 48);
      const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(hh))), _mm_movelh_ps(d2, d2));
      sc[i] = _mm512_permutexvar_ps(idx, _mm512_zextps128_ps512(f));
      sc[i + 1] = _mm512_permutexvar_ps(idx_hi, _mm512_zextps128_ps512(f));
    }
    if constexpr (R % 2 == 1) {
      const uint8_t* p = w0 + (R - 1) * rb + b * BB;
      uint16_t h0, h1;
      std::memcpy(&h0, p, 2);
      std::memcpy(&h1, p + BB, 2);
      const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (static_cast<uint32_t>(h1) << 16)))), d2);
      sc[R - 1] = _mm512_permutexvar_ps(idx, _mm512_zextps128_ps512(f));
    }
    for (int i = 0; i < R; ++i) {
      __m512i v = QBlk<WT>::load(w0 + i * rb + b * BB, false);
      if constexpr (WT == WType::Q8_0) v = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, v, xv)), sc[i], acc[i]);
    }
  }
  if (nb2 != nb) {
    // A last single block: lanes 8..15 of every operand are zero, as in q_tile.
    const int64_t b = nb2;
    pf.upto<H>(static_cast<size_t>(nb) * (R * BB));
    const __m512i xv = _mm512_maskz_loadu_epi8(0xffffffffull, a.q + b * 32);
    const __m512i corr = _mm512_maskz_set1_epi32(0x0001, a.corr[b]);
    const __m512 dx = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(a.d[b]));
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      __m512i v = QBlk<WT>::load(p, true);
      if constexpr (WT == WType::Q8_0) v = _mm512_maskz_xor_epi32(0x00ff, v, _mm512_set1_epi8(static_cast<char>(0x80)));
      const __m512 dw = scale_pair_f16(p, nullptr);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, v, xv)), _mm512_mul_ps(dw, dx), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

// Tokens in lanes (VNNI only), for groups of 8 tokens: lane pair (t, j) of the
// accumulator belongs to token t. Each 8-byte piece k of a weight block is broadcast to
// all lanes and multiplied with the same piece of the 8 tokens' blocks, so one vpdpbusd
// serves 8 tokens and the int -> float scaling costs 3 instructions per (row, block)
// for all 8 tokens instead of per token. G groups (G * 8 tokens) share each pass over the
// rows: the weight pieces are broadcast, flipped (or unpacked) and their scale converted
// once for all G groups (one thread, 151936 x 2048 with 32 tokens: 98-100 -> 118-132 GMAC/s;
// 16 tokens 103 -> 117-130; G = 4 was no faster than 2).
template <WType WT, int R, int G>
void q_tile_g8(const uint8_t* w0, size_t rb, int64_t nb, const uint8_t* grp, int64_t t0, int64_t n, float* y,
               int64_t ldy, int64_t r, Prefetch pf) {
  constexpr size_t BB = QBlk<WT>::kBytes;
  const size_t gstride = static_cast<size_t>(nb) * kGroupBlockBytes;
  __m512 acc[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    pf.upto<Hint::T1>(static_cast<size_t>(b + 1) * (R * BB));
    const uint8_t* gb = grp + b * kGroupBlockBytes;
    for (int i = 0; i < R; ++i) {
      const uint8_t* p = w0 + i * rb + b * BB;
      int64_t q0, q1, q2, q3;
      __m512i w0v, w1v, w2v, w3v;
      if constexpr (WT == WType::Q8_0) {
        std::memcpy(&q0, p + 2, 8);
        std::memcpy(&q1, p + 10, 8);
        std::memcpy(&q2, p + 18, 8);
        std::memcpy(&q3, p + 26, 8);
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        w0v = _mm512_xor_si512(_mm512_set1_epi64(q0), flip);
        w1v = _mm512_xor_si512(_mm512_set1_epi64(q1), flip);
        w2v = _mm512_xor_si512(_mm512_set1_epi64(q2), flip);
        w3v = _mm512_xor_si512(_mm512_set1_epi64(q3), flip);
      } else {
        std::memcpy(&q0, p + 2, 8);
        std::memcpy(&q1, p + 10, 8);
        const __m512i m = _mm512_set1_epi8(0x0f);
        const __m512i a = _mm512_set1_epi64(q0), c = _mm512_set1_epi64(q1);
        w0v = _mm512_and_si512(a, m);                         // weights 0..7
        w1v = _mm512_and_si512(c, m);                         // weights 8..15
        w2v = _mm512_and_si512(_mm512_srli_epi16(a, 4), m);   // weights 16..23
        w3v = _mm512_and_si512(_mm512_srli_epi16(c, 4), m);   // weights 24..31
        (void)q2;
        (void)q3;
      }
      uint16_t h;
      std::memcpy(&h, p, 2);
      const __m512 dw = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
      for (int g = 0; g < G; ++g) {
        const uint8_t* gg = gb + g * gstride;
        __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(gg + 320), w0v, _mm512_loadu_si512(gg));
        s = _mm512_dpbusd_epi32(s, w1v, _mm512_loadu_si512(gg + 64));
        s = _mm512_dpbusd_epi32(s, w2v, _mm512_loadu_si512(gg + 128));
        s = _mm512_dpbusd_epi32(s, w3v, _mm512_loadu_si512(gg + 192));
        const __m512 dx = _mm512_loadu_ps(reinterpret_cast<const float*>(gg + 256));
        acc[i][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, dx), acc[i][g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t tg = t0 + 8 * g, tn = std::min<int64_t>(8, n - tg);
    for (int i = 0; i < R; ++i) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[i][g]);
      for (int64_t t = 0; t < tn; ++t) y[(tg + t) * ldy + r + i] = lanes[2 * t] + lanes[2 * t + 1];
    }
  }
}

// Tokens in lanes, one lane per token (Q8_0, VNNI), for pairs of groups of 16 tokens
// (32 tokens): each 4-byte piece k (k = 0..7) of a weight block is broadcast and
// multiplied with the same piece of the 16 tokens' blocks of each group. q_tile_g8 gives
// each token two lanes (8-byte pieces), so its int -> float scaling (vcvtdq2ps, vmulps,
// vfmadd) follows every 4 vpdpbusd; here every 8. The R rows x 2 groups of a block are
// R x 2 independent sums of 8 vpdpbusd each, issued piece by piece across all of them
// (piece k of every row and group, then piece k + 1): consecutive vpdpbusd never depend
// on each other, and each piece of the activations is loaded once for all R rows.
// Against issuing them row by row (each sum's 8 vpdpbusd in a row, in two chains of 4,
// the activations reloaded per row), paired runs in one process, two threads: 2048 x 768
// with 64 tokens and 768 / 2048 x 2048 with 512 tokens (prefill) 1.09x; 151936 x 2048
// with 32 tokens (batched decode's LM head) unchanged at ~160 GMAC/s per thread, 69% of
// vpdpbusd's peak here (233): without the int -> float scaling (vcvtdq2ps, vmulps, vfmadd
// per row, group and block) it ran at 192, so those three instructions per 8 vpdpbusd,
// which share its pipes, are most of the rest.
template <int R>
void q8_tile_g16(const uint8_t* w0, size_t rb, int64_t nb, const uint8_t* grp, size_t bstride, float* y, int64_t ldy,
                 int64_t r, Prefetch pf) {
  constexpr size_t BB = QBlk<WType::Q8_0>::kBytes;
  constexpr size_t G1 = kGroup16BlockBytes;  // offset of the second group's block
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    pf.upto<Hint::T1>(static_cast<size_t>(b + 1) * (R * BB));
    const uint8_t* gb = grp + b * bstride;
    const uint8_t* p = w0 + b * BB;
    __m512i s[R][2];
    const __m512i c0 = _mm512_loadu_si512(gb + 576), c1 = _mm512_loadu_si512(gb + G1 + 576);
    for (int i = 0; i < R; ++i) {
      s[i][0] = c0;
      s[i][1] = c1;
    }
    for (int k = 0; k < 8; ++k) {
      const __m512i x0 = _mm512_loadu_si512(gb + 64 * k), x1 = _mm512_loadu_si512(gb + G1 + 64 * k);
      for (int i = 0; i < R; ++i) {
        int32_t q;
        std::memcpy(&q, p + i * rb + 2 + 4 * k, 4);
        const __m512i wv = _mm512_xor_si512(_mm512_set1_epi32(q), flip);  // q + 128, unsigned
        s[i][0] = _mm512_dpbusd_epi32(s[i][0], wv, x0);
        s[i][1] = _mm512_dpbusd_epi32(s[i][1], wv, x1);
      }
    }
    const __m512 dx0 = _mm512_loadu_ps(reinterpret_cast<const float*>(gb + 512));
    const __m512 dx1 = _mm512_loadu_ps(reinterpret_cast<const float*>(gb + G1 + 512));
    for (int i = 0; i < R; ++i) {
      uint16_t h;
      std::memcpy(&h, p + i * rb, 2);
      const __m512 dw = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
      acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][0]), _mm512_mul_ps(dw, dx0), acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][1]), _mm512_mul_ps(dw, dx1), acc[i][1]);
    }
  }
  for (int g = 0; g < 2; ++g) {
    for (int i = 0; i < R; ++i) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[i][g]);
      for (int t = 0; t < 16; ++t) y[(16 * g + t) * ldy + r + i] = lanes[t];
    }
  }
}

// Rows in lanes (Q8_0, VNNI), for a few tokens (batched decode: 2..7 tokens per expert).
// In q_tile every vpdpbusd yields 8 int32 lanes per (row, token, block), each needing its
// own int -> float conversion and scaling, so with 1..4 tokens those three float ops per
// vpdpbusd (plus the per-row and per-token setup) bound the speed, well below the memory
// bandwidth. Here a tile is 8 rows: the 8 rows' 32-byte blocks are transposed (4 inserts,
// 4 two-source qword permutes, 4 128-bit shuffles) into P_k, k = 0..3, whose qword j is
// bytes 8k..8k+7 of row j's block, and each token's piece k is broadcast to all lanes.
// The 4 vpdpbusd of a (token, block) accumulate into the same two lanes per row, so the
// conversion and scaling run once per 4 vpdpbusd; the transposition and the 8 weight
// scales are shared by all tokens of the tile. Per row the arithmetic is the same
// whatever its place in the tile (short tiles repeat their last row, unused), so results
// do not depend on how rows are split into calls.
template <int T>
void q8_rows8(const uint8_t* w0, size_t rb, int rows, int64_t nb, const QActs& a, int64_t cols, int64_t t0, float* y,
              int64_t ldy, int64_t r, Prefetch pf) {
  constexpr size_t BB = QBlk<WType::Q8_0>::kBytes;
  const uint8_t* rp[8];
  for (int j = 0; j < 8; ++j) rp[j] = w0 + static_cast<size_t>(std::min(j, rows - 1)) * rb;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // Z01 = [row 0 pieces 0..3 | row 1 pieces 0..3] (qwords), Z23 likewise:
  // ia picks [r0p0 r1p0 r2p0 r3p0 | r0p1 r1p1 r2p1 r3p1], ib the same for pieces 2, 3.
  const __m512i ia = _mm512_set_epi64(13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i ib = _mm512_set_epi64(15, 11, 7, 3, 14, 10, 6, 2);
  const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const int8_t* xq = a.q + t0 * cols;
  const float* xd = a.d + t0 * nb;
  const int32_t* xc = a.corr + t0 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    pf.template upto<Hint::T1>(static_cast<size_t>(b + 1) * (8 * BB));
    const size_t off = static_cast<size_t>(b) * BB;
    const auto two = [&](int j) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp[j] + off + 2));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp[j + 1] + off + 2));
      return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), flip);  // q + 128, unsigned
    };
    const __m512i z01 = two(0), z23 = two(2), z45 = two(4), z67 = two(6);
    const __m512i ta = _mm512_permutex2var_epi64(z01, ia, z23);
    const __m512i tb = _mm512_permutex2var_epi64(z01, ib, z23);
    const __m512i tc = _mm512_permutex2var_epi64(z45, ia, z67);
    const __m512i td = _mm512_permutex2var_epi64(z45, ib, z67);
    const __m512i p0 = _mm512_shuffle_i64x2(ta, tc, 0x44);
    const __m512i p1 = _mm512_shuffle_i64x2(ta, tc, 0xEE);
    const __m512i p2 = _mm512_shuffle_i64x2(tb, td, 0x44);
    const __m512i p3 = _mm512_shuffle_i64x2(tb, td, 0xEE);
    // The 8 rows' f16 scales, converted at once and spread to each row's two lanes.
    uint64_t h[2];
    for (int g = 0; g < 2; ++g) {
      uint16_t v0, v1, v2, v3;
      std::memcpy(&v0, rp[4 * g] + off, 2);
      std::memcpy(&v1, rp[4 * g + 1] + off, 2);
      std::memcpy(&v2, rp[4 * g + 2] + off, 2);
      std::memcpy(&v3, rp[4 * g + 3] + off, 2);
      h[g] = v0 | (static_cast<uint64_t>(v1) << 16) | (static_cast<uint64_t>(v2) << 32) | (static_cast<uint64_t>(v3) << 48);
    }
    const __m256 dw8 = _mm256_cvtph_ps(_mm_set_epi64x(static_cast<long long>(h[1]), static_cast<long long>(h[0])));
    const __m512 dw = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(dw8));
    for (int t = 0; t < T; ++t) {
      const int8_t* xp = xq + t * cols + b * 32;
      // The correction lands in the first lane of each row's pair.
      __m512i s = _mm512_maskz_set1_epi32(0x5555, xc[t * nb + b]);
      s = _mm512_dpbusd_epi32(s, p0, _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xp))));
      s = _mm512_dpbusd_epi32(s, p1, _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xp + 8))));
      s = _mm512_dpbusd_epi32(s, p2, _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xp + 16))));
      s = _mm512_dpbusd_epi32(s, p3, _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xp + 24))));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(xd[t * nb + b])), acc[t]);
    }
  }
  const __mmask8 keep = static_cast<__mmask8>((1u << rows) - 1);
  for (int t = 0; t < T; ++t) {
    // Lane 2j + lane 2j+1 -> row j.
    const __m512 sum = _mm512_add_ps(acc[t], _mm512_permute_ps(acc[t], 0xB1));
    const __m512 rowsv = _mm512_maskz_compress_ps(0x5555, sum);
    _mm256_mask_storeu_ps(y + (t0 + t) * ldy + r, keep, _mm512_castps512_ps256(rowsv));
  }
}

// Rows [r0, r1) for all tokens of x through q8_rows8: tiles of 8 rows, tokens in tiles of
// up to 8; only the first token tile of a row tile streams its rows from memory.
void matmul_q8_rows8(const WMat& w, const QActs& a, int64_t n, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  const int64_t nb = w.cols / 32;
  const uint8_t* end = w.data + r1 * rb;
  // ~16 KB ahead into L2: a tile reads 8 row streams at once, and with the T0 hint of the
  // per-token tiles the next 8-row tile (17 KB for 2048 columns) evicted the current one
  // from L1 (1536 x 2048, 2 tokens, from memory: T0 16 GB/s, T1 23 GB/s; 2048 x 768 gained
  // 18 -> 22 GB/s from 16 KB ahead instead of 4 KB).
  const size_t ahead = ahead_for(8 * rb, 16384);
  prefetch_start(w.data + r0 * rb, ahead, end);
  for (int64_t r = r0; r < r1; r += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, r1 - r));
    const uint8_t* w0 = w.data + r * rb;
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
      const int T = static_cast<int>(std::min<int64_t>(8, n - t0));
      const Prefetch pf(w0, static_cast<size_t>(rows) * rb, t0 == 0 ? ahead : 0, end);
      switch (T) {
        case 1: q8_rows8<1>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 2: q8_rows8<2>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 3: q8_rows8<3>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 4: q8_rows8<4>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 5: q8_rows8<5>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 6: q8_rows8<6>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        case 7: q8_rows8<7>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
        default: q8_rows8<8>(w0, rb, rows, nb, a, w.cols, t0, y, ldy, r, pf); break;
      }
    }
  }
}

// ---- Float formats ------------------------------------------------------------------

enum class FMode { F32, F16, Bf16Dot, Bf16Plain };

template <FMode M, int R, int T, Hint H = Hint::T0>
void f_tile(const uint8_t* w0, size_t rb, const uint8_t* xbase, int64_t cols, int64_t t0, float* y, int64_t ldy,
            int64_t r, Prefetch pf = Prefetch(nullptr, 0, 0, nullptr)) {
  constexpr size_t kElem = M == FMode::F32 ? 4 : 2;
  __m512 acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  if constexpr (M == FMode::Bf16Dot) {
    // 32 columns per step: pairs of bf16 products summed into each float lane.
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xbase) + t0 * cols;
    for (int64_t c = 0; c < cols; c += 32) {
      pf.upto<H>(static_cast<size_t>(c + 32) * kElem * R);
      const int64_t left = cols - c;
      const __mmask32 m = left >= 32 ? 0xffffffffu : static_cast<__mmask32>((1ull << left) - 1);
      __m512i wv[R];
      for (int i = 0; i < R; ++i) wv[i] = _mm512_maskz_loadu_epi16(m, w0 + i * rb + c * 2);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_maskz_loadu_epi16(m, xs + t * cols + c);
        for (int i = 0; i < R; ++i)
          acc[i][t] = _mm512_dpbf16_ps(acc[i][t], reinterpret_cast<__m512bh>(wv[i]), reinterpret_cast<__m512bh>(xv));
      }
    }
  } else if constexpr (M == FMode::Bf16Plain) {
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xbase) + t0 * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      pf.upto<H>(static_cast<size_t>(c + 16) * kElem * R);
      const int64_t left = cols - c;
      const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      __m512 wv[R];
      for (int i = 0; i < R; ++i)
        wv[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w0 + i * rb + c * 2)), 16));
      for (int t = 0; t < T; ++t) {
        const __m512 xv =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xs + t * cols + c)), 16));
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
      }
    }
  } else {
    const float* xs = reinterpret_cast<const float*>(xbase) + t0 * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      pf.upto<H>(static_cast<size_t>(c + 16) * kElem * R);
      const int64_t left = cols - c;
      const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      __m512 wv[R];
      for (int i = 0; i < R; ++i) {
        if constexpr (M == FMode::F32) {
          wv[i] = _mm512_maskz_loadu_ps(m, w0 + i * rb + c * 4);
        } else {
          wv[i] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w0 + i * rb + c * 2));
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, xs + t * cols + c);
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// ---- Tiling -------------------------------------------------------------------------

// Rows per tile and tokens per tile for a call with n tokens: all n tokens in one tile
// up to 8 (decode: each weight block is loaded once), 4 x 4 tiles beyond that.
struct Tiling {
  int rows;
  int tokens;
};
inline Tiling tiling_for(int64_t n) {
  if (n <= 4) return {4, static_cast<int>(n)};
  if (n <= 8) return {2, static_cast<int>(n)};
  return {4, 4};
}
// Quantized formats: 2-row tiles for 1-2 tokens (memory-bound: see Prefetch), else as
// above. Q4_0 with 2 tokens is compute-bound (nibble unpacking): 4 rows share each
// token's activation loads there.
template <WType WT>
inline Tiling q_tiling_for(int64_t n) {
  if (n == 1 || (n == 2 && WT == WType::Q8_0)) return {2, static_cast<int>(n)};
  return tiling_for(n);
}

// Calls tile<R, T>(args...) for run-time R in 1..4 and T in 1..8.
template <template <int, int> class Tile, typename... Args>
void dispatch_tile(int R, int T, Args... args) {
#define MOE_T(R_)                                   \
  switch (T) {                                      \
    case 1: Tile<R_, 1>::run(args...); break;       \
    case 2: Tile<R_, 2>::run(args...); break;       \
    case 3: Tile<R_, 3>::run(args...); break;       \
    case 4: Tile<R_, 4>::run(args...); break;       \
    case 5: Tile<R_, 5>::run(args...); break;       \
    case 6: Tile<R_, 6>::run(args...); break;       \
    case 7: Tile<R_, 7>::run(args...); break;       \
    default: Tile<R_, 8>::run(args...); break;      \
  }
  switch (R) {
    case 1: MOE_T(1) break;
    case 2: MOE_T(2) break;
    case 3: MOE_T(3) break;
    default: MOE_T(4) break;
  }
#undef MOE_T
}

template <WType WT, QMode M>
struct QTile {
  template <int R, int T>
  struct Of {
    static void run(const uint8_t* w0, size_t rb, int64_t nb, const QActs* a, int64_t cols, int64_t t0, float* y,
                    int64_t ldy, int64_t r, size_t ahead, const uint8_t* end) {
      // 4 x 8 and 3 x 8 tiles are never requested (see tiling_for); keep them small to compile.
      if constexpr (R * T <= 16) {
        q_tile<WT, M, R, T>(w0, rb, nb, *a, cols, t0, y, ldy, r, Prefetch(w0, R * rb, ahead, end));
      } else {
        for (int i = 0; i < R; ++i)
          q_tile<WT, M, 1, T>(w0 + i * rb, rb, nb, *a, cols, t0, y, ldy, r + i, Prefetch(w0 + i * rb, rb, ahead, end));
      }
    }
  };
};

template <FMode M>
struct FTile {
  template <int R, int T>
  struct Of {
    static void run(const uint8_t* w0, size_t rb, const uint8_t* xb, int64_t cols, int64_t t0, float* y, int64_t ldy,
                    int64_t r) {
      if constexpr (R * T <= 16) {
        f_tile<M, R, T>(w0, rb, xb, cols, t0, y, ldy, r);
      } else {
        for (int i = 0; i < R; ++i) f_tile<M, 1, T>(w0 + i * rb, rb, xb, cols, t0, y, ldy, r + i);
      }
    }
  };
};

template <typename Run>
void for_tiles(const Tiling tl, int64_t n, int64_t r0, int64_t r1, const Run& run) {
  for (int64_t r = r0; r < r1; r += tl.rows) {
    const int R = static_cast<int>(r1 - r < tl.rows ? r1 - r : tl.rows);
    for (int64_t t0 = 0; t0 < n; t0 += tl.tokens) {
      const int T = static_cast<int>(n - t0 < tl.tokens ? n - t0 : tl.tokens);
      run(R, T, r, t0);
    }
  }
}

template <WType WT, QMode M>
void matmul_q(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  const int64_t nb = w.cols / 32;
  const QActs a = qacts(x);
  const uint8_t* end = w.data + r1 * rb;  // prefetches stop here: later rows are another call's
  if constexpr (WT == WType::Q8_0 && M == QMode::Vnni) {
    // 2..7 tokens: rows in lanes (single thread, 1536 x 2048 from memory: 2 tokens 21 -> 23-25
    // GB/s, 4 tokens 15 -> 20 GB/s, 7 tokens 13.6 -> 14.8 GB/s); 8 tokens and more stay
    // with q_tile_g8, which was faster there.
    if (x.n >= 2 && x.n <= 7) {
      matmul_q8_rows8(w, a, x.n, r0, r1, y, ldy);
      return;
    }
  }
  if (M == QMode::Vnni && x.n == 1) {
    // Rows of 6 KB or more (Mixtral's down projection: 14336 columns, 15 KB at Q8_0, 8 KB
    // at Q4_0) go one row per tile, prefetching into L2 8 KB ahead in the row's own linear
    // stream. With 2-row tiles, two streams a row apart and a linear prefetch into L1 one
    // whole tile (16-30 KB, up to L1's size) ahead: one thread, 4096 x 14336 at Q8_0 from
    // memory, 15.6 GB/s against 29 for 14336 x 4096 (rows of 4 KB) in the same run; 1-row
    // tiles prefetching into L1 reached 18 GB/s at best (4 KB ahead; farther was slower),
    // into L2 8 KB ahead 28-30 GB/s. Paired runs in one process, 1-row tiles against 2-row
    // ones: 4096 x 14336 Q8_0 1.79x (two threads 1.37x), Q4_0 1.27x (two threads 1.26x);
    // 4096 x 5792 Q8_0 (6 KB rows) 1.19x; 4096 x 11008 Q4_0 (6 KB) 1.07x. Shorter rows
    // keep 2-row tiles, faster there (14336 x 4096 Q8_0, 4 KB rows: 6% slower with 1-row
    // tiles, 2048 x 768: 38%), and their L1 prefetch (L2 was no faster).
    // q_n1 does the same arithmetic per row whatever R, so results do not change.
    // Since then (the measurements above are Zen 4's; they still hold Q4_0), Q8_0 rows
    // all go one row per tile, prefetching 8 KB ahead with the non-temporal hint (the
    // weights are read once per step). Zen 5, two threads from memory, paired runs in
    // one process against 2-row tiles with the T0 prefetch 4 KB ahead: 151936 x 2048
    // 1.16-1.41x, 2048 x 4096 1.11-1.21x, 768 x 2048 1.09-1.25x, 4096 x 14336 1.00-1.05x
    // (against its former T1 hint); with the four-block loop of one-row tiles, rows under
    // 2 KB too: 4096 x 1024 1.14x, 20480 x 768 1.10x, 2048 x 768 1.02x, 2048 x 512 1.02x.
    // Q4_0 stays as it was: its unpacking makes it compute-bound here, and 1-row tiles
    // were 0.87x (0.97x with the four-block loop).
    if (WT == WType::Q8_0) {
      prefetch_start(w.data + r0 * rb, kLongRowAhead, end);
      for (int64_t r = r0; r < r1; ++r)
        q_n1<WT, 1, Hint::Nta>(w.data + r * rb, rb, nb, a, y + r, Prefetch(w.data + r * rb, rb, kLongRowAhead, end));
      return;
    }
    if (rb >= kLongRowBytes) {
      prefetch_start(w.data + r0 * rb, kLongRowAhead, end);
      for (int64_t r = r0; r < r1; ++r)
        q_n1<WT, 1, Hint::T1>(w.data + r * rb, rb, nb, a, y + r, Prefetch(w.data + r * rb, rb, kLongRowAhead, end));
      return;
    }
    const size_t ahead = ahead_for(2 * rb, tile_ahead_target(1));
    prefetch_start(w.data + r0 * rb, ahead, end);
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) q_n1<WT, 2>(w.data + r * rb, rb, nb, a, y + r, Prefetch(w.data + r * rb, 2 * rb, ahead, end));
    if (r < r1) q_n1<WT, 1>(w.data + r * rb, rb, nb, a, y + r, Prefetch(w.data + r * rb, rb, ahead, end));
    return;
  }
  int64_t grouped = 0;  // tokens [0, grouped) go through q8_tile_g16 / q_tile_g8
  if constexpr (M == QMode::Vnni) {
    // Q8_0: pairs of groups of 16 tokens first (q8_tile_g16). One group of 16 alone was
    // slower than 2 groups of 8 in q_tile_g8 (its 8 weight broadcasts and flips per row
    // and block then serve only 8 vpdpbusd), so 16..31 tokens stay with q_tile_g8.
    const int64_t done16 = WT == WType::Q8_0 ? x.n / 32 * 32 : 0;
    const size_t bstride16 = static_cast<size_t>(x.n / 32 * 2) * kGroup16BlockBytes;
    // Then groups of 8 tokens; a last partial group of >= 5 tokens too (padding lanes are
    // cheaper than per-token epilogues), fewer go to the per-token tiles.
    const int64_t rest = x.n - done16;
    grouped = done16 + (rest % 8 >= 5 ? (rest + 7) / 8 * 8 : rest / 8 * 8);
    constexpr int GR = 4;
    const size_t ahead = ahead_for(GR * rb, 8192);
    if (grouped > 0) prefetch_start(w.data + r0 * rb, ahead, end);
    // q8_tile_g16 writes into a buffer of 16 rows x 32 tokens, copied out a token's 16 rows
    // at a time: its own scattered 4-row writes, 32 tokens ldy floats apart (a multiple of
    // 4 KB: one L1 set), evicted each other's lines between tiles (one thread, 2048 x 768
    // with 32 tokens: 81 GMAC/s with them, 137 without any).
    constexpr int RS = 16;
    // With AMX (kernels_amx.cc) the 16-token groups go through the tile unit instead of
    // q8_tile_g16, with the same results; the other tokens as below.
    const bool amx = done16 > 0 && amx_q8_active();
    if (amx) matmul_q8_amx(w, x, r0, r1, y, ldy);
    for (int64_t rs = r0; rs < r1; rs += RS) {
      const int64_t re = std::min<int64_t>(r1, rs + RS);
      for (int64_t t0 = 0; t0 < (amx ? 0 : done16); t0 += 32) {
        alignas(64) float buf[32 * RS];
        const uint8_t* grp = a.groups16 + (t0 / 16) * kGroup16BlockBytes;
        for (int64_t r = rs; r < re; r += GR) {
          const int R = static_cast<int>(re - r < GR ? re - r : GR);
          const uint8_t* w0 = w.data + r * rb;
          // Only the first pass streams the rows from memory; the others find them cached.
          const Prefetch pf(w0, R * rb, t0 == 0 ? ahead : 0, end);
          const int64_t rr = r - rs;
          switch (R) {
            case 1: q8_tile_g16<1>(w0, rb, nb, grp, bstride16, buf, RS, rr, pf); break;
            case 2: q8_tile_g16<2>(w0, rb, nb, grp, bstride16, buf, RS, rr, pf); break;
            case 3: q8_tile_g16<3>(w0, rb, nb, grp, bstride16, buf, RS, rr, pf); break;
            default: q8_tile_g16<GR>(w0, rb, nb, grp, bstride16, buf, RS, rr, pf); break;
          }
        }
        const __mmask16 keep = static_cast<__mmask16>((1u << (re - rs)) - 1);
        for (int t = 0; t < 32; ++t) _mm512_mask_storeu_ps(y + (t0 + t) * ldy + rs, keep, _mm512_load_ps(buf + t * RS));
      }
      for (int64_t r = rs; r < re; r += GR) {
        const int R = static_cast<int>(re - r < GR ? re - r : GR);
        for (int64_t t0 = done16; t0 < grouped; t0 += 16) {
          const uint8_t* grp = a.groups + (t0 / 8) * nb * kGroupBlockBytes;
          const uint8_t* w0 = w.data + r * rb;
          // Only the first pass streams the rows from memory; the others find them cached.
          // Passes take 2 groups while 2 remain.
          const Prefetch pf(w0, R * rb, t0 == 0 ? ahead : 0, end);
          const int64_t n = std::min(grouped, x.n);
          if (grouped - t0 >= 16) {
            switch (R) {
              case 1: q_tile_g8<WT, 1, 2>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              case 2: q_tile_g8<WT, 2, 2>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              case 3: q_tile_g8<WT, 3, 2>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              default: q_tile_g8<WT, GR, 2>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
            }
          } else {
            switch (R) {
              case 1: q_tile_g8<WT, 1, 1>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              case 2: q_tile_g8<WT, 2, 1>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              case 3: q_tile_g8<WT, 3, 1>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
              default: q_tile_g8<WT, GR, 1>(w0, rb, nb, grp, t0, n, y, ldy, r, pf); break;
            }
          }
        }
      }
    }
  }
  if (grouped >= x.n) return;
  const int64_t rest = x.n - grouped;
  const QActs shifted{a.q + grouped * w.cols, a.d + grouped * nb, a.corr + grouped * nb, nullptr, nullptr};
  float* ys = y + grouped * ldy;
  const Tiling tl = q_tiling_for<WT>(rest);
  const size_t ahead = ahead_for(static_cast<size_t>(tl.rows) * rb, tile_ahead_target(tl.tokens));
  if (grouped == 0) prefetch_start(w.data + r0 * rb, ahead, end);
  for_tiles(tl, rest, r0, r1, [&](int R, int T, int64_t r, int64_t t0) {
    // Only the first token tile over these rows streams them from memory.
    dispatch_tile<QTile<WT, M>::template Of>(R, T, w.data + r * rb, rb, nb, &shifted, w.cols, t0, ys, ldy, r,
                                             t0 == 0 ? ahead : size_t{0}, end);
  });
}

// 2-row tiles of T tokens with the quantized kernels' linear prefetch (see matmul_q).
template <FMode M, int T>
void matmul_f_two_rows(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy, size_t rb) {
  const uint8_t* end = w.data + r1 * rb;
  const size_t ahead = ahead_for(2 * rb, tile_ahead_target(T));
  prefetch_start(w.data + r0 * rb, ahead, end);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) f_tile<M, 2, T>(w.data + r * rb, rb, x.buf.data(), w.cols, 0, y, ldy, r, Prefetch(w.data + r * rb, 2 * rb, ahead, end));
  if (r < r1) f_tile<M, 1, T>(w.data + r * rb, rb, x.buf.data(), w.cols, 0, y, ldy, r, Prefetch(w.data + r * rb, rb, ahead, end));
}

template <FMode M>
void matmul_f(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const size_t rb = row_bytes(w.type, w.cols);
  // One token (decode) is memory-bound: the quantized kernels' streaming, here too (see
  // matmul_q): 2-row tiles, and 1-row tiles prefetching into L2 from 6 KB rows on. Before,
  // 4-row tiles without software prefetch; paired runs in one process, two threads: bf16
  // 2048 x 768 1.87x, 768 x 2048 1.14x, 2048 x 2048 1.24x, f16 2048 x 768 2.02x, f32
  // 4096 x 2048 1.11x; one thread bf16 151936 x 2048 1.44x, 14336 x 4096 (8 KB rows, 1-row
  // tiles) 1.36x. Two tokens (batched decode: a few tokens per expert) go through 2-row
  // tiles too (one thread: bf16 2048 x 768 2.34x, 768 x 2048 1.24x, 151936 x 2048 1.24x,
  // f32 2048 x 768 1.82x; two threads bf16 2048 x 768 1.83x, 768 x 2048 1.02x); with 3
  // and 4 tokens the 4-row tiles stayed (4 tokens, bf16 768 x 2048: 0.89x with 2-row
  // tiles). The per-row arithmetic is that of any f_tile, whatever R: results do not change.
  if (x.n == 1 && rb >= kLongRowBytes) {
    const uint8_t* end = w.data + r1 * rb;
    prefetch_start(w.data + r0 * rb, kLongRowAhead, end);
    for (int64_t r = r0; r < r1; ++r)
      f_tile<M, 1, 1, Hint::T1>(w.data + r * rb, rb, x.buf.data(), w.cols, 0, y, ldy, r, Prefetch(w.data + r * rb, rb, kLongRowAhead, end));
    return;
  }
  if (x.n == 1) return matmul_f_two_rows<M, 1>(w, x, r0, r1, y, ldy, rb);
  if (x.n == 2 && rb < kLongRowBytes) return matmul_f_two_rows<M, 2>(w, x, r0, r1, y, ldy, rb);
  for_tiles(tiling_for(x.n), x.n, r0, r1, [&](int R, int T, int64_t r, int64_t t0) {
    dispatch_tile<FTile<M>::template Of>(R, T, w.data + r * rb, rb, x.buf.data(), w.cols, t0, y, ldy, r);
  });
}

// ---- Activation preparation ---------------------------------------------------------

// Same arithmetic as quantize_act_block (max |x|, 127 / amax, x * id rounded to nearest
// even, clamp), so the bytes are identical to the scalar variant's.
void quantize_acts_row(const float* x, int64_t nb, int8_t* q, float* d, int32_t* corr, int32_t mul) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b);
    const __m512 v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const __m512 a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), absmask));
    const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), absmask));
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m512i i0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), lo), hi);
    const __m512i i1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtepi32_epi8(i1));
    d[b] = amax / 127.0f;
    corr[b] = -mul * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}

// Round to nearest even, NaN made quiet: the scalar f32_to_bf16, 16 at a time.
inline __m256i to_bf16(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

}  // namespace

void prepare_avx512(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out) {
  switch (t) {
    case WType::F32:
    case WType::F16: prepare_scalar(t, x, n, cols, ldx, out); return;  // a copy
    case WType::BF16: {
      uint16_t* o = reinterpret_cast<uint16_t*>(out.buf.data());
      for (int64_t i = 0; i < n; ++i) {
        const float* xr = x + i * ldx;
        uint16_t* orow = o + i * cols;
        for (int64_t c = 0; c < cols; c += 16) {
          const int64_t left = cols - c;
          const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
          _mm256_mask_storeu_epi16(orow + c, m, to_bf16(_mm512_maskz_loadu_ps(m, xr + c)));
        }
      }
      return;
    }
    case WType::Q8_0:
    case WType::Q4_0: {
      quantize_act_rows(t, x, n, cols, ldx, out, quantize_acts_row);
      return;
    }
  }
}

void matmul_avx512(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  static const bool vnni = cpu_features().avx512vnni;
  static const bool bf16 = cpu_features().avx512bf16;
  switch (w.type) {
    case WType::Q8_0:
      if (vnni) matmul_q<WType::Q8_0, QMode::Vnni>(w, x, r0, r1, y, ldy);
      else matmul_q<WType::Q8_0, QMode::Plain>(w, x, r0, r1, y, ldy);
      return;
    case WType::Q4_0:
      if (vnni) matmul_q<WType::Q4_0, QMode::Vnni>(w, x, r0, r1, y, ldy);
      else matmul_q<WType::Q4_0, QMode::Plain>(w, x, r0, r1, y, ldy);
      return;
    case WType::BF16:
      if (bf16) matmul_f<FMode::Bf16Dot>(w, x, r0, r1, y, ldy);
      else matmul_f<FMode::Bf16Plain>(w, x, r0, r1, y, ldy);
      return;
    case WType::F16: matmul_f<FMode::F16>(w, x, r0, r1, y, ldy); return;
    case WType::F32: matmul_f<FMode::F32>(w, x, r0, r1, y, ldy); return;
  }
}

uint64_t stream_avx512(const uint8_t* p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  uint64_t s = static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3))));
  for (; i < bytes; ++i) s += p[i];
  return s;
}

// ---- Load-time packing ---------------------------------------------------------------

namespace {

// roundf: to nearest, halves away from zero. v - trunc(v) is exact for every float.
inline __m512 roundf512(__m512 v) {
  const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));  // copysign(1, v)
  return _mm512_mask_add_ps(t, away, t, one);
}

}  // namespace

bool quantize_block_avx512(WType t, const float* x, uint8_t* blk) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const __m512 aa = _mm512_abs_ps(a), ab = _mm512_abs_ps(b);
  // NaN or infinity anywhere: the scalar definition decides (std::max skips NaN).
  const __m512 inf = _mm512_set1_ps(INFINITY);
  if (_mm512_cmp_ps_mask(aa, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(ab, inf, _CMP_NLT_UQ)) return false;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
  if (t == WType::Q8_0) {
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t dh = f32_to_f16(d);
    std::memcpy(blk, &dh, 2);
    const __m512 vid = _mm512_set1_ps(id);
    // The product rounded on its own (explicit rounding: never fused with roundf512's subtraction).
    constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 2), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(roundf512(_mm512_mul_round_ps(a, vid, kRne)))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 18), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(roundf512(_mm512_mul_round_ps(b, vid, kRne)))));
    return true;
  }
  if (t != WType::Q4_0) return false;
  // The signed value of the largest magnitude, the first one on ties; 0 when all are zero.
  float max = 0.0f;
  if (amax != 0.0f) {
    const __m512 va = _mm512_set1_ps(amax);
    const uint32_t hit = static_cast<uint32_t>(_mm512_cmp_ps_mask(aa, va, _CMP_EQ_OQ)) |
                         (static_cast<uint32_t>(_mm512_cmp_ps_mask(ab, va, _CMP_EQ_OQ)) << 16);
    max = x[__builtin_ctz(hit)];
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = f32_to_f16(d);
  std::memcpy(blk, &dh, 2);
  const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(8.5f);
  const __m512i fifteen = _mm512_set1_epi32(15);
  // min(15, (int8)(x * id + 8.5f)): the product and the sum rounded separately, as in the
  // scalar code (the explicit-rounding forms keep the compiler from fusing them into an FMA,
  // which turns 1.6875 * (1 / -0.375) + 8.5 from 4 into 3.9999998).
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i qa = _mm512_min_epi32(fifteen, _mm512_cvttps_epi32(_mm512_add_round_ps(_mm512_mul_round_ps(a, vid, kRne), half, kRne)));
  const __m512i qb = _mm512_min_epi32(fifteen, _mm512_cvttps_epi32(_mm512_add_round_ps(_mm512_mul_round_ps(b, vid, kRne), half, kRne)));
  const __m128i lo = _mm512_cvtepi32_epi8(qa), hi = _mm512_cvtepi32_epi8(qb);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(blk + 2), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
  return true;
}

void bf16_to_f32_avx512(const uint8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = bf16_to_f32(h);
  }
}

uint64_t int8_peak_avx512(int64_t iters, int64_t* macs) {
  // See int8_peak_avx2. With VNNI the accumulators are vpdpbusd's own chains (latency
  // about 5 cycles): twelve of them keep two issue ports busy; they share four operands,
  // which cannot fold because each instruction adds into its own chain. Without VNNI the
  // products are separate instructions, so every chain has its own operand (as in AVX2).
  static const bool vnni = cpu_features().avx512vnni;
  constexpr int C = 12;
  __m512i acc[C], a[4];
  for (int c = 0; c < C; ++c) acc[c] = _mm512_set1_epi32(c);
  for (int c = 0; c < 4; ++c) a[c] = _mm512_set1_epi8(static_cast<char>(3 + c));
  const __m512i b = _mm512_set1_epi8(-5), ones16 = _mm512_set1_epi16(1);
  int chains = C;
  if (vnni) {
    for (int64_t i = 0; i < iters; ++i) {
      __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]));
      for (int c = 0; c < C; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a[c & 3], b);
    }
  } else {
    chains = 4;
    for (int64_t i = 0; i < iters; ++i) {
      __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]));
      for (int c = 0; c < 4; ++c) acc[c] = _mm512_add_epi32(acc[c], _mm512_madd_epi16(_mm512_maddubs_epi16(a[c], b), ones16));
    }
  }
  __m512i s = acc[0];
  for (int c = 1; c < C; ++c) s = _mm512_xor_si512(s, acc[c]);
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, s);
  *macs = iters * chains * 64;
  uint64_t out = 0;
  for (uint64_t v : lanes) out += v;
  return out;
}

}  // namespace kdetail
}  // namespace moe
