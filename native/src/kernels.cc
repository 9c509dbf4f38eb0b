// Weight formats (F32, F16, BF16, ggml's Q8_0 / Q4_0), activation preparation, the
// scalar reference kernels and the run-time dispatch to the AVX2 / AVX-512 variants.
//
// Dispatch: the variant is chosen once, at first use, as the best the CPU and OS
// support (cpu_features), unless the environment variable
//   MOE_SERVE_ISA=scalar|avx2|avx512
// names another one (a variant the CPU cannot run is ignored, with a warning on stderr).
// set_isa() overrides both at run time (tests, benchmarks). Inside the avx512 family,
// Q8_0 products of 32 tokens and more go through Intel AMX tiles where usable
// (kernels_amx.cc: CPU and OS support, a self-test and a timing against the VNNI kernel at
// first use; MOE_SERVE_AMX=0 turns it off). Packing weights at load
// (quantize_rows into Q8_0 / Q4_0, dequantize_row from BF16) takes the AVX-512 code when
// that variant is active, byte for byte the scalar definitions below (about 3x faster
// loading of a bf16 checkpoint into q8).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "kernels.h"
#include "thread_pool.h"

namespace moe {

// ---- Scalar conversions --------------------------------------------------------------

namespace {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

uint16_t f32_to_f16(float f) {
  uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {  // inf or NaN (NaN keeps the top of its payload, made quiet)
    return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u | ((x >> 13) & 0x3ffu) : 0x7c00u));
  }
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (x < 0x38800000u) {
    // Below the smallest normal half (2^-14): in units of 2^-24, rounded to nearest even
    // by the float addition itself (0.5f has an ulp of exactly 2^-24).
    const float a = float_of(x) + 0.5f;
    return static_cast<uint16_t>(sign | (bits_of(a) - 0x3f000000u));
  }
  // Normal: re-bias the exponent (127 -> 15) and round the 13 dropped bits to nearest even;
  // a mantissa carry correctly bumps the exponent.
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (x >> 13));
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return float_of(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
  if (em >= 0x0400u) return float_of(sign | ((em << 13) + 0x38000000u));
  const float v = static_cast<float>(em) * 5.9604644775390625e-8f;  // subnormal: em * 2^-24
  return float_of(sign | bits_of(v));
}

uint16_t f32_to_bf16(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// ---- Formats -------------------------------------------------------------------------

const char* wtype_name(WType t) {
  switch (t) {
    case WType::F32: return "f32";
    case WType::F16: return "f16";
    case WType::BF16: return "bf16";
    case WType::Q8_0: return "q8_0";
    case WType::Q4_0: return "q4_0";
  }
  return "?";
}

bool wtype_from_name(const std::string& name, WType* out) {
  std::string s = name;
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const WType all[] = {WType::F32, WType::F16, WType::BF16, WType::Q8_0, WType::Q4_0};
  for (WType t : all) {
    if (s == wtype_name(t)) {
      *out = t;
      return true;
    }
  }
  return false;
}

size_t row_bytes(WType t, int64_t cols) {
  const size_t c = static_cast<size_t>(cols);
  switch (t) {
    case WType::F32: return c * 4;
    case WType::F16:
    case WType::BF16: return c * 2;
    case WType::Q8_0: return c / 32 * 34;
    case WType::Q4_0: return c / 32 * 18;
  }
  return 0;
}

int64_t block_cols(WType t) { return (t == WType::Q8_0 || t == WType::Q4_0) ? 32 : 1; }

namespace {

Isa current();

void check_cols(WType t, int64_t cols) {
  if (cols < 0 || cols % block_cols(t) != 0) {
    throw std::invalid_argument(std::string("kernels: ") + wtype_name(t) + " needs cols % " +
                                std::to_string(block_cols(t)) + " == 0, got " + std::to_string(cols));
  }
}

// ggml's quantize_row_q8_0 (reference): d = amax / 127, q = roundf(x * (1 / d)).
void quantize_q8_0_block(const float* x, uint8_t* blk) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = f32_to_f16(d);
  std::memcpy(blk, &dh, 2);
  for (int j = 0; j < 32; ++j) blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(x[j] * id)));
}

// ggml's quantize_row_q4_0 (reference): d = max / -8 where max is the signed value of
// largest magnitude (the first one on ties), q = min(15, (int8)(x / d + 8.5)).
void quantize_q4_0_block(const float* x, uint8_t* blk) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = f32_to_f16(d);
  std::memcpy(blk, &dh, 2);
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[16 + j] * id + 8.5f)));
    blk[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

}  // namespace

void quantize_rows(WType t, const float* src, int64_t rows, int64_t cols, uint8_t* dst) {
  check_cols(t, cols);
  const size_t rb = row_bytes(t, cols);
  const bool vec = current() == Isa::Avx512;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * cols;
    uint8_t* o = dst + static_cast<size_t>(r) * rb;
    switch (t) {
      case WType::F32: std::memcpy(o, x, rb); break;
      case WType::F16:
        for (int64_t c = 0; c < cols; ++c) {
          const uint16_t h = f32_to_f16(x[c]);
          std::memcpy(o + 2 * c, &h, 2);
        }
        break;
      case WType::BF16:
        for (int64_t c = 0; c < cols; ++c) {
          const uint16_t h = f32_to_bf16(x[c]);
          std::memcpy(o + 2 * c, &h, 2);
        }
        break;
      case WType::Q8_0:
        for (int64_t b = 0; b < cols / 32; ++b) {
          if (!vec || !kdetail::quantize_block_avx512(t, x + 32 * b, o + 34 * b)) quantize_q8_0_block(x + 32 * b, o + 34 * b);
        }
        break;
      case WType::Q4_0:
        for (int64_t b = 0; b < cols / 32; ++b) {
          if (!vec || !kdetail::quantize_block_avx512(t, x + 32 * b, o + 18 * b)) quantize_q4_0_block(x + 32 * b, o + 18 * b);
        }
        break;
    }
  }
}

void dequantize_row(WType t, const uint8_t* src, int64_t cols, float* dst) {
  check_cols(t, cols);
  switch (t) {
    case WType::F32: std::memcpy(dst, src, static_cast<size_t>(cols) * 4); break;
    case WType::F16:
      for (int64_t c = 0; c < cols; ++c) dst[c] = load_f16(src + 2 * c);
      break;
    case WType::BF16:
      if (current() == Isa::Avx512) {
        kdetail::bf16_to_f32_avx512(src, cols, dst);
        break;
      }
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t h;
        std::memcpy(&h, src + 2 * c, 2);
        dst[c] = bf16_to_f32(h);
      }
      break;
    case WType::Q8_0:
      for (int64_t b = 0; b < cols / 32; ++b) {
        const uint8_t* blk = src + 34 * b;
        const float d = load_f16(blk);
        for (int j = 0; j < 32; ++j) dst[32 * b + j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
      }
      break;
    case WType::Q4_0:
      for (int64_t b = 0; b < cols / 32; ++b) {
        const uint8_t* blk = src + 18 * b;
        const float d = load_f16(blk);
        for (int j = 0; j < 16; ++j) {
          dst[32 * b + j] = d * static_cast<float>((blk[2 + j] & 0x0f) - 8);
          dst[32 * b + 16 + j] = d * static_cast<float>((blk[2 + j] >> 4) - 8);
        }
      }
      break;
  }
}

// ---- Activations ---------------------------------------------------------------------

namespace kdetail {

size_t acts_bytes(WType t, int64_t n, int64_t cols) {
  const size_t e = static_cast<size_t>(n) * static_cast<size_t>(cols);
  switch (t) {
    case WType::F32:
    case WType::F16: return e * 4;
    case WType::BF16: return e * 2;
    case WType::Q8_0:
    case WType::Q4_0: {
      const size_t groups = static_cast<size_t>((n + 7) / 8);
      const size_t groups16 = static_cast<size_t>(n / 32 * 2);
      return e + static_cast<size_t>(n) * static_cast<size_t>(cols / 32) * 8 +
             groups * static_cast<size_t>(cols / 32) * kGroupBlockBytes +
             groups16 * static_cast<size_t>(cols / 32) * kGroup16BlockBytes;
    }
  }
  return 0;
}

QActs qacts(const Acts& a) {
  const size_t e = static_cast<size_t>(a.n) * static_cast<size_t>(a.cols);
  const size_t nb = static_cast<size_t>(a.n) * static_cast<size_t>(a.cols / 32);
  const uint8_t* base = a.buf.data();
  const size_t g8 = static_cast<size_t>((a.n + 7) / 8) * static_cast<size_t>(a.cols / 32) * kGroupBlockBytes;
  return QActs{reinterpret_cast<const int8_t*>(base), reinterpret_cast<const float*>(base + e),
               reinterpret_cast<const int32_t*>(base + e + nb * 4), base + e + nb * 8, base + e + nb * 8 + g8};
}

void build_groups(Acts& a) {
  const QActs v = qacts(a);
  const int64_t nb = a.cols / 32;
  const int64_t groups = (a.n + 7) / 8;
  uint8_t* out = const_cast<uint8_t*>(v.groups);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* o = out + (g * nb + b) * kGroupBlockBytes;
      int8_t* q8 = reinterpret_cast<int8_t*>(o);
      float* d8 = reinterpret_cast<float*>(o + 256);
      int32_t* c8 = reinterpret_cast<int32_t*>(o + 320);
      for (int t = 0; t < 8; ++t) {
        const int64_t tok = g * 8 + t;
        const bool real = tok < a.n;
        for (int k = 0; k < 4; ++k) {
          if (real) std::memcpy(q8 + k * 64 + t * 8, v.q + tok * a.cols + 32 * b + 8 * k, 8);
          else std::memset(q8 + k * 64 + t * 8, 0, 8);
        }
        d8[2 * t] = d8[2 * t + 1] = real ? v.d[tok * nb + b] : 0.0f;
        c8[2 * t] = real ? v.corr[tok * nb + b] : 0;
        c8[2 * t + 1] = 0;
      }
    }
  }
  const int64_t groups16 = a.n / 32 * 2;
  uint8_t* out16 = const_cast<uint8_t*>(v.groups16);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t g = 0; g < groups16; ++g) {
      uint8_t* o = out16 + (b * groups16 + g) * kGroup16BlockBytes;
      float* d16 = reinterpret_cast<float*>(o + 512);
      int32_t* c16 = reinterpret_cast<int32_t*>(o + 576);
      for (int t = 0; t < 16; ++t) {
        const int64_t tok = g * 16 + t;
        for (int k = 0; k < 8; ++k) std::memcpy(o + k * 64 + t * 4, v.q + tok * a.cols + 32 * b + 4 * k, 4);
        d16[t] = v.d[tok * nb + b];
        c16[t] = v.corr[tok * nb + b];
      }
    }
  }
}

// Rounding is to nearest even (what the SIMD conversions do), so every ISA produces the
// same bytes; 127 / amax is computed once per block, as the SIMD variants do.
void quantize_act_block(const float* x, int8_t* q, float* d, int32_t* corr, int32_t corr_mul) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  int32_t sum = 0;
  for (int j = 0; j < 32; ++j) {
    const float v = std::nearbyint(x[j] * id);
    const int iv = static_cast<int>(std::max(-127.0f, std::min(127.0f, v)));
    q[j] = static_cast<int8_t>(iv);
    sum += iv;
  }
  *d = amax / 127.0f;
  *corr = -corr_mul * sum;
}

void prepare_scalar(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out) {
  uint8_t* base = out.buf.data();
  switch (t) {
    case WType::F32:
    case WType::F16: {
      float* o = reinterpret_cast<float*>(base);
      for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * cols, x + i * ldx, static_cast<size_t>(cols) * 4);
      break;
    }
    case WType::BF16: {
      uint16_t* o = reinterpret_cast<uint16_t*>(base);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < cols; ++c) o[i * cols + c] = f32_to_bf16(x[i * ldx + c]);
      break;
    }
    case WType::Q8_0:
    case WType::Q4_0: {
      const QActs a = qacts(out);
      const int64_t nb = cols / 32;
      const int32_t mul = t == WType::Q4_0 ? 8 : 128;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t b = 0; b < nb; ++b)
          quantize_act_block(x + i * ldx + 32 * b, const_cast<int8_t*>(a.q) + i * cols + 32 * b,
                             const_cast<float*>(a.d) + i * nb + b, const_cast<int32_t*>(a.corr) + i * nb + b, mul);
      break;
    }
  }
}

// The reference: exact integer dot products per block, float scaling and accumulation,
// in the plainest order. Float formats accumulate in float, like the SIMD variants.
void matmul_scalar(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const int64_t cols = w.cols;
  const size_t rb = row_bytes(w.type, cols);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.data + static_cast<size_t>(r) * rb;
    for (int64_t t = 0; t < x.n; ++t) {
      float acc = 0.0f;
      switch (w.type) {
        case WType::F32:
        case WType::F16: {
          const float* xv = reinterpret_cast<const float*>(x.buf.data()) + t * cols;
          if (w.type == WType::F32) {
            for (int64_t c = 0; c < cols; ++c) {
              float wv;
              std::memcpy(&wv, row + 4 * c, 4);
              acc += wv * xv[c];
            }
          } else {
            for (int64_t c = 0; c < cols; ++c) acc += load_f16(row + 2 * c) * xv[c];
          }
          break;
        }
        case WType::BF16: {
          const uint16_t* xv = reinterpret_cast<const uint16_t*>(x.buf.data()) + t * cols;
          for (int64_t c = 0; c < cols; ++c) {
            uint16_t h;
            std::memcpy(&h, row + 2 * c, 2);
            acc += bf16_to_f32(h) * bf16_to_f32(xv[c]);
          }
          break;
        }
        case WType::Q8_0:
        case WType::Q4_0: {
          const QActs a = qacts(x);
          const int64_t nb = cols / 32;
          for (int64_t b = 0; b < nb; ++b) {
            const int8_t* xq = a.q + t * cols + 32 * b;
            int32_t isum = 0;
            float dw;
            if (w.type == WType::Q8_0) {
              const uint8_t* blk = row + 34 * b;
              dw = load_f16(blk);
              for (int j = 0; j < 32; ++j) isum += static_cast<int8_t>(blk[2 + j]) * xq[j];
            } else {
              const uint8_t* blk = row + 18 * b;
              dw = load_f16(blk);
              for (int j = 0; j < 16; ++j) {
                isum += ((blk[2 + j] & 0x0f) - 8) * xq[j];
                isum += ((blk[2 + j] >> 4) - 8) * xq[16 + j];
              }
            }
            acc += static_cast<float>(isum) * (dw * a.d[t * nb + b]);
          }
          break;
        }
      }
      y[t * ldy + r] = acc;
    }
  }
}

}  // namespace kdetail

void acts_dequantize(const Acts& x, int64_t t, float* dst) {
  if (t < 0 || t >= x.n) throw std::out_of_range("acts_dequantize: token out of range");
  const int64_t cols = x.cols;
  switch (x.for_type) {
    case WType::F32:
    case WType::F16:
      std::memcpy(dst, reinterpret_cast<const float*>(x.buf.data()) + t * cols, static_cast<size_t>(cols) * 4);
      break;
    case WType::BF16: {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(x.buf.data()) + t * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] = bf16_to_f32(v[c]);
      break;
    }
    case WType::Q8_0:
    case WType::Q4_0: {
      const kdetail::QActs a = kdetail::qacts(x);
      const int64_t nb = cols / 32;
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(a.q[t * cols + c]) * a.d[t * nb + c / 32];
      break;
    }
  }
}

// ---- Dispatch ------------------------------------------------------------------------

namespace {

struct Variant {
  kdetail::MatmulFn matmul;
  kdetail::PrepareFn prepare;
};

Variant variant_of(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return {kdetail::matmul_avx512, kdetail::prepare_avx512};
    case Isa::Avx2: return {kdetail::matmul_avx2, kdetail::prepare_avx2};
    case Isa::Scalar: break;
  }
  return {kdetail::matmul_scalar, kdetail::prepare_scalar};
}

bool can_run(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::Avx512: return f.avx512f && f.avx512bw && f.avx512vl;  // every such CPU also has DQ
  }
  return false;
}

std::atomic<int> g_isa{-1};
std::once_flag g_isa_once;

Isa initial_isa() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("MOE_SERVE_ISA"); env != nullptr && env[0] != '\0') {
    const std::string s = env;
    Isa want = isa;
    bool known = true;
    if (s == "scalar") want = Isa::Scalar;
    else if (s == "avx2") want = Isa::Avx2;
    else if (s == "avx512") want = Isa::Avx512;
    else known = false;
    if (!known) {
      std::fprintf(stderr, "moe-serve: MOE_SERVE_ISA='%s' is not scalar|avx2|avx512; using %s\n", env, isa_name(isa));
    } else if (!can_run(want)) {
      std::fprintf(stderr, "moe-serve: MOE_SERVE_ISA=%s is not supported by this CPU; using %s\n", env, isa_name(isa));
    } else {
      isa = want;
    }
  }
  return isa;
}

Isa current() {
  std::call_once(g_isa_once, [] {
    int expected = -1;
    g_isa.compare_exchange_strong(expected, static_cast<int>(initial_isa()));
  });
  return static_cast<Isa>(g_isa.load(std::memory_order_relaxed));
}

}  // namespace

Isa best_isa() {
  if (can_run(Isa::Avx512)) return Isa::Avx512;
  if (can_run(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

Isa active_isa() { return current(); }

bool set_isa(Isa isa) {
  current();  // the environment default is applied first, so it never overrides this
  if (!can_run(isa)) return false;
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

bool amx_in_use() { return current() == Isa::Avx512 && kdetail::amx_q8_active(); }

const char* amx_status() {
  // kernels_amx.cc is built with AVX-512 flags: reached only where the CPU has AVX-512.
  if (!can_run(Isa::Avx512)) return "not supported by this CPU (no AVX-512, no AMX)";
  if (current() != Isa::Avx512) return "not used: the active kernels are not the avx512 family";
  return kdetail::amx_q8_status();
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "?";
}

void prepare_acts(WType for_type, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out) {
  check_cols(for_type, cols);
  if (n < 0 || ldx < cols) throw std::invalid_argument("prepare_acts: need n >= 0 and ldx >= cols");
  out.for_type = for_type;
  out.n = n;
  out.cols = cols;
  const size_t need = kdetail::acts_bytes(for_type, n, cols);
  if (out.buf.size() < need) out.buf.resize(need);  // never shrinks: reuse stays allocation-free
  if (n == 0 || cols == 0) return;
  variant_of(current()).prepare(for_type, x, n, cols, ldx, out);
  // The token-grouped copy is only read for n >= 5 (see kernels_avx512.cc matmul_q).
  if ((for_type == WType::Q8_0 || for_type == WType::Q4_0) && n >= 5) kdetail::build_groups(out);
}

void gather_acts(const Acts& src, const int32_t* rows, int64_t n, Acts& out) {
  if (n < 0) throw std::invalid_argument("gather_acts: need n >= 0");
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= src.n) {
      throw std::out_of_range("gather_acts: row " + std::to_string(rows[i]) + " outside the " + std::to_string(src.n) + " prepared");
    }
  }
  const WType t = src.for_type;
  const int64_t cols = src.cols;
  out.for_type = t;
  out.n = n;
  out.cols = cols;
  const size_t need = kdetail::acts_bytes(t, n, cols);
  if (out.buf.size() < need) out.buf.resize(need);
  if (n == 0 || cols == 0) return;
  if (t == WType::Q8_0 || t == WType::Q4_0) {
    const kdetail::QActs s = kdetail::qacts(src), o = kdetail::qacts(out);
    const int64_t nb = cols / 32;
    int8_t* oq = const_cast<int8_t*>(o.q);
    float* od = const_cast<float*>(o.d);
    int32_t* oc = const_cast<int32_t*>(o.corr);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rows[i];
      std::memcpy(oq + i * cols, s.q + r * cols, static_cast<size_t>(cols));
      std::memcpy(od + i * nb, s.d + r * nb, static_cast<size_t>(nb) * 4);
      std::memcpy(oc + i * nb, s.corr + r * nb, static_cast<size_t>(nb) * 4);
    }
    if (n >= 5) kdetail::build_groups(out);
    return;
  }
  const size_t rb = kdetail::acts_bytes(t, 1, cols);  // one row of float / f16 / bf16 values
  for (int64_t i = 0; i < n; ++i) std::memcpy(out.buf.data() + static_cast<size_t>(i) * rb, src.buf.data() + static_cast<size_t>(rows[i]) * rb, rb);
}

void matmul(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (x.for_type != w.type || x.cols != w.cols) {
    throw std::invalid_argument(std::string("matmul: activations prepared for ") + wtype_name(x.for_type) + " x " +
                                std::to_string(x.cols) + " cols, weights are " + wtype_name(w.type) + " x " +
                                std::to_string(w.cols));
  }
  if (r0 < 0 || r1 > w.rows || r0 > r1) throw std::out_of_range("matmul: row range outside the matrix");
  if (r0 == r1 || x.n == 0) return;
  if (w.cols == 0) {
    for (int64_t t = 0; t < x.n; ++t)
      for (int64_t r = r0; r < r1; ++r) y[t * ldy + r] = 0.0f;
    return;
  }
  variant_of(current()).matmul(w, x, r0, r1, y, ldy);
}

void matmul_parallel(ThreadPool& pool, const WMat& w, const Acts& x, float* y, int64_t ldy) {
  // Chunks of a multiple of 8 rows (the kernels' row blocking), about 8 per thread so the
  // atomic work counter evens out uneven progress, but >= ~64 KB of weights per chunk so
  // the hand-out cost stays negligible.
  const int64_t threads = pool.size();
  const int64_t rb = static_cast<int64_t>(std::max<size_t>(row_bytes(w.type, w.cols), 1));
  int64_t chunk = (w.rows + threads * 8 - 1) / (threads * 8);
  chunk = std::max(chunk, (int64_t{65536} + rb - 1) / rb);
  chunk = (chunk + 7) / 8 * 8;
  const int64_t chunks = (w.rows + chunk - 1) / chunk;
  pool.parallel_for(chunks, 1, [&](int64_t i, int) {
    const int64_t a = i * chunk;
    matmul(w, x, a, std::min(w.rows, a + chunk), y, ldy);
  });
}

uint64_t int8_mac_peak_q4_groups(int64_t iters, int64_t* macs) {
  if (current() == Isa::Avx2) return kdetail::int8_peak_q4_groups_avx2(iters, macs);
  return int8_mac_peak(iters, macs);
}

uint64_t int8_mac_peak(int64_t iters, int64_t* macs) {
  switch (current()) {
    case Isa::Avx512: return kdetail::int8_peak_avx512(iters, macs);
    case Isa::Avx2: return kdetail::int8_peak_avx2(iters, macs);
    case Isa::Scalar: break;
  }
  // The portable build has no int8 dot-product instruction to probe: its kernels' inner
  // loop (int32 += int8 * int8 over a block, vectorised by the compiler for the baseline
  // ISA) on two 1 KiB rows that stay in L1, 32 blocks per round.
  alignas(64) int8_t a[1024], b[1024];
  for (int i = 0; i < 1024; ++i) {
    a[i] = static_cast<int8_t>((i * 37) % 255 - 127);
    b[i] = static_cast<int8_t>((i * 91) % 255 - 127);
  }
  uint64_t out = 0;
  for (int64_t i = 0; i < iters; i += 32) {
    const int8_t* pa = a;
    __asm__ volatile("" : "+r"(pa) : : "memory");
    for (int blk = 0; blk < 32; ++blk) {
      int32_t s = 0;
      for (int j = 0; j < 32; ++j) s += static_cast<int32_t>(pa[32 * blk + j]) * static_cast<int32_t>(b[32 * blk + j]);
      out += static_cast<uint32_t>(s);
    }
  }
  *macs = (iters + 31) / 32 * 1024;
  return out;
}

uint64_t stream_read(const uint8_t* p, size_t bytes) {
  switch (current()) {
    case Isa::Avx512: return kdetail::stream_avx512(p, bytes);
    case Isa::Avx2: return kdetail::stream_avx2(p, bytes);
    case Isa::Scalar: break;
  }
  uint64_t s = 0;
  for (size_t i = 0; i + 8 <= bytes; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s += v;
  }
  return s;
}

}  // namespace moe
