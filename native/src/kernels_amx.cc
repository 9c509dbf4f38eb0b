// Q8_0 x Q8_0 matrix product on Intel AMX (AMX-TILE + AMX-INT8), for the tokens the
// AVX-512 kernel takes in 16-token groups (prefill, batched decode: 32 tokens and more).
//
// This file is compiled twice:
//   - as itself, with the AMX and AVX-512 flags (CMakeLists.txt): the tile instructions
//     (LDTILECFG, TILELOADD, TILEZERO, TDPBSSD, TILESTORED); kernels_avx512.cc calls it
//     once amx_q8_active() (kernels_amx_runtime.cc) has found that the CPU and the OS
//     support them, that a start-up self-test gives the VNNI kernel's exact results (a
//     fault in it is caught) and that a start-up timing finds it faster than the VNNI
//     kernel. Only the kernel lives here, with internal linkage and no library templates:
//     anything a linker could merge across objects would carry these flags to every CPU;
//   - as kernels_amx_emu.cc (MOE_AMX_EMULATED), with the baseline flags: the same kernel
//     with each tile instruction carried out by a plain C++ model of its definition (Intel
//     SDM, "Intel AMX instruction set reference"), so that its tiling, its layouts and its
//     scaling are tested on any host (test/kernels.test.ts, through amxMatmulTest).
//
// Per block b (32 columns), per 16 weight rows and per pair of 16-token groups:
//   A  (tmm0) = 16 rows x 32 bytes: the rows' int8 weights, loaded straight from the Q8_0
//               blocks (stride: the row's bytes), or from a zero-padded copy for the last
//               rows of a matrix whose row count is not a multiple of 16;
//   B0, B1 (tmm1, tmm2) = 8 rows x 64 bytes: the activations' 16-token groups as
//               prepare_acts lays them out (kernels.h, "groups of 16 tokens": row k holds
//               bytes 4k..4k+3 of each token's block, which is TDPBSSD's B layout);
//   C0, C1 (tmm3, tmm4) = 16 x 16 int32: TDPBSSD (signed x signed) gives each (row,
//               token) block dot product exactly, stored and then scaled in AVX-512:
//               acc = fma(float(dot), dw * dx, acc), blocks in order.
// That float arithmetic is q8_tile_g16's (kernels_avx512.cc) operation for operation, so
// the outputs are bitwise those of the VNNI kernel; the self-test checks it on the CPU.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

// The hardware build needs a compiler with AMX support (CMakeLists.txt passes its flags
// only then); without it this file only says so (amx_q8_status).
#if !defined(MOE_AMX_EMULATED) && !(defined(__AMX_TILE__) && defined(__AMX_INT8__))
#define MOE_AMX_UNAVAILABLE 1
#endif

#if !defined(MOE_AMX_EMULATED) && !defined(MOE_AMX_UNAVAILABLE)
#include <immintrin.h>
#endif

namespace moe {
namespace kdetail {

#ifdef MOE_AMX_UNAVAILABLE

bool amx_q8_built() { return false; }
void matmul_q8_amx(const WMat&, const Acts&, int64_t, int64_t, float*, int64_t) {}

#else

namespace {

// Tile numbers (literals: the intrinsics paste them into the instruction's register name).
#define MOE_TA 0
#define MOE_TB0 1
#define MOE_TB1 2
#define MOE_TC0 3
#define MOE_TC1 4

// The palette-1 configuration (64 bytes): palette, start row, then bytes per row of tiles
// 0..15 (uint16) at byte 16, rows of tiles 0..15 (uint8) at byte 48.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig make_config() {
  TileConfig c;
  c.colsb[MOE_TA] = 32;
  c.rows[MOE_TA] = 16;
  c.colsb[MOE_TB0] = c.colsb[MOE_TB1] = 64;
  c.rows[MOE_TB0] = c.rows[MOE_TB1] = 8;
  c.colsb[MOE_TC0] = c.colsb[MOE_TC1] = 64;
  c.rows[MOE_TC0] = c.rows[MOE_TC1] = 16;
  return c;
}

#ifdef MOE_AMX_EMULATED

// ---- The tile instructions, modelled -------------------------------------------------
// Each tile register: rows x colsb bytes as configured (palette 1: at most 16 x 64). Bytes
// beyond the configured shape read as zero and are never stored, as on the hardware.
struct TileReg {
  int rows = 0;
  int colsb = 0;
  alignas(64) uint8_t d[16][64];
};
thread_local TileReg g_tiles[8];
thread_local bool g_configured = false;

void check(bool ok, const char* what) {
  if (!ok) throw std::logic_error(std::string("emulated AMX: ") + what);
}

void tile_loadconfig(const TileConfig& c) {
  check(c.palette == 1, "palette must be 1");
  check(c.start_row == 0, "start_row must be 0");
  for (uint8_t r : c.reserved) check(r == 0, "bytes 2-15 are reserved (zero)");
  // Palette 1 names 8 tiles; the fields of tiles 8-15 are reserved (zero).
  for (int t = 8; t < 16; ++t) check(c.colsb[t] == 0 && c.rows[t] == 0, "palette 1 has 8 tiles");
  for (int t = 0; t < 8; ++t) {
    check(c.rows[t] <= 16 && c.colsb[t] <= 64 && (c.rows[t] == 0) == (c.colsb[t] == 0), "tile shape out of palette 1");
    g_tiles[t].rows = c.rows[t];
    g_tiles[t].colsb = c.colsb[t];
    std::memset(g_tiles[t].d, 0, sizeof g_tiles[t].d);
  }
  g_configured = true;
}
void tile_release() { g_configured = false; }

template <int T>
void tile_load(const void* base, size_t stride) {
  check(g_configured, "TILELOADD before LDTILECFG");
  TileReg& r = g_tiles[T];
  std::memset(r.d, 0, sizeof r.d);
  for (int i = 0; i < r.rows; ++i) std::memcpy(r.d[i], static_cast<const uint8_t*>(base) + i * stride, static_cast<size_t>(r.colsb));
}
template <int T>
void tile_zero() {
  check(g_configured, "TILEZERO before LDTILECFG");
  std::memset(g_tiles[T].d, 0, sizeof g_tiles[T].d);
}
template <int T>
void tile_store(void* base, size_t stride) {
  check(g_configured, "TILESTORED before LDTILECFG");
  const TileReg& r = g_tiles[T];
  for (int i = 0; i < r.rows; ++i) std::memcpy(static_cast<uint8_t*>(base) + i * stride, r.d[i], static_cast<size_t>(r.colsb));
}
// TDPBSSD C, A, B: C[m][n] += sum over k < colsb(A) / 4, i < 4 of A[m][4k + i] * B[k][4n + i]
// (signed bytes, int32 sums), for m < rows(C), n < colsb(C) / 4. Shapes must agree:
// rows(A) = rows(C), colsb(B) = colsb(C), rows(B) = colsb(A) / 4.
template <int C, int A, int B>
void tile_dpbssd() {
  check(g_configured, "TDPBSSD before LDTILECFG");
  TileReg& c = g_tiles[C];
  const TileReg& a = g_tiles[A];
  const TileReg& b = g_tiles[B];
  check(a.rows == c.rows && b.colsb == c.colsb && b.rows * 4 == a.colsb, "TDPBSSD shapes do not agree");
  for (int m = 0; m < c.rows; ++m) {
    for (int n = 0; n < c.colsb / 4; ++n) {
      int32_t s;
      std::memcpy(&s, c.d[m] + 4 * n, 4);
      for (int k = 0; k < a.colsb / 4; ++k)
        for (int i = 0; i < 4; ++i) s += static_cast<int8_t>(a.d[m][4 * k + i]) * static_cast<int8_t>(b.d[k][4 * n + i]);
      std::memcpy(c.d[m] + 4 * n, &s, 4);
    }
  }
}

#define MOE_TILE_LOAD(T, base, stride) tile_load<T>(base, stride)
#define MOE_TILE_ZERO(T) tile_zero<T>()
#define MOE_TILE_STORE(T, base, stride) tile_store<T>(base, stride)
#define MOE_TILE_DPBSSD(C, A, B) tile_dpbssd<C, A, B>()

// acc[t] = fma(float(dot[t]), dw * dx[t], acc[t]) for the 16 tokens: IEEE single
// operations, one rounding each, as the AVX-512 instructions do.
inline void scale_row(float* acc, const int32_t* dot, float dw, const float* dx) {
  for (int t = 0; t < 16; ++t) acc[t] = std::fma(static_cast<float>(dot[t]), dw * dx[t], acc[t]);
}
inline float f16_value(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

#else  // the tile instructions themselves

void tile_loadconfig(const TileConfig& c) { _tile_loadconfig(&c); }
void tile_release() { _tile_release(); }
#define MOE_TILE_LOAD(T, base, stride) _tile_loadd(T, base, stride)
#define MOE_TILE_ZERO(T) _tile_zero(T)
#define MOE_TILE_STORE(T, base, stride) _tile_stored(T, base, stride)
#define MOE_TILE_DPBSSD(C, A, B) _tile_dpbssd(C, A, B)
inline void scale_row(float* acc, const int32_t* dot, float dw, const float* dx) {
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(dw), _mm512_loadu_ps(dx));
  _mm512_storeu_ps(acc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(dot)), s, _mm512_loadu_ps(acc)));
}
inline float f16_value(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

#endif

// Tokens [0, n16) (n16 a multiple of 32, every 16-token group of x) for rows [r0, r1).
void amx_q8_impl(const WMat& w, const QActs& a, int64_t n16, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  constexpr size_t BB = 34;
  const size_t rb = row_bytes(WType::Q8_0, w.cols);
  const int64_t nb = w.cols / 32;
  const int64_t groups = n16 / 16;  // 16-token groups (an even count: the kernel takes them in pairs)
  const size_t bstride = static_cast<size_t>(groups) * kGroup16BlockBytes;
  const TileConfig cfg = make_config();
  tile_loadconfig(cfg);
  alignas(64) int32_t c0[16][16];
  alignas(64) int32_t c1[16][16];
  alignas(64) float acc0[16][16];
  alignas(64) float acc1[16][16];
  alignas(64) uint8_t pad[16][32];  // the last rows' weights of a block, zero-padded
  float dw[16];
  for (int64_t rs = r0; rs < r1; rs += 16) {
    const int R = static_cast<int>(r1 - rs < 16 ? r1 - rs : 16);
    const uint8_t* w0 = w.data + rs * rb;
    for (int64_t g = 0; g < groups; g += 2) {
      std::memset(acc0, 0, sizeof acc0);
      std::memset(acc1, 0, sizeof acc1);
      const uint8_t* gb = a.groups16 + g * kGroup16BlockBytes;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w0 + b * BB;
        if (R == 16) {
          MOE_TILE_LOAD(MOE_TA, blk + 2, rb);
        } else {
          std::memset(pad, 0, sizeof pad);
          for (int i = 0; i < R; ++i) std::memcpy(pad[i], blk + i * rb + 2, 32);
          MOE_TILE_LOAD(MOE_TA, pad, 32);
        }
        const uint8_t* g0 = gb + b * bstride;
        const uint8_t* g1 = g0 + kGroup16BlockBytes;
        MOE_TILE_LOAD(MOE_TB0, g0, 64);
        MOE_TILE_LOAD(MOE_TB1, g1, 64);
        MOE_TILE_ZERO(MOE_TC0);
        MOE_TILE_ZERO(MOE_TC1);
        MOE_TILE_DPBSSD(MOE_TC0, MOE_TA, MOE_TB0);
        MOE_TILE_DPBSSD(MOE_TC1, MOE_TA, MOE_TB1);
        MOE_TILE_STORE(MOE_TC0, c0, 64);
        MOE_TILE_STORE(MOE_TC1, c1, 64);
        const float* dx0 = reinterpret_cast<const float*>(g0 + 512);
        const float* dx1 = reinterpret_cast<const float*>(g1 + 512);
        for (int i = 0; i < R; ++i) dw[i] = f16_value(blk + i * rb);
        for (int i = 0; i < R; ++i) {
          scale_row(acc0[i], c0[i], dw[i], dx0);
          scale_row(acc1[i], c1[i], dw[i], dx1);
        }
      }
      for (int t = 0; t < 16; ++t) {
        float* y0 = y + (g * 16 + t) * ldy + rs;
        float* y1 = y + (g * 16 + 16 + t) * ldy + rs;
        for (int i = 0; i < R; ++i) {
          y0[i] = acc0[i][t];
          y1[i] = acc1[i][t];
        }
      }
    }
  }
  tile_release();
}

}  // namespace

#ifdef MOE_AMX_EMULATED

void matmul_q8_amx_emulated(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const int64_t n16 = x.n / 32 * 32;
  if (n16 > 0) amx_q8_impl(w, qacts(x), n16, r0, r1, y, ldy);
}

#else

bool amx_q8_built() { return true; }

void matmul_q8_amx(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const int64_t n16 = x.n / 32 * 32;
  if (n16 > 0) amx_q8_impl(w, qacts(x), n16, r0, r1, y, ldy);
}


#endif  // MOE_AMX_EMULATED
#endif  // MOE_AMX_UNAVAILABLE

}  // namespace kdetail
}  // namespace moe
