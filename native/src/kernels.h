// Weight formats and the matrix kernels of the engine. The API is format-agnostic;
// each format has a scalar implementation (always built, always tested) and faster
// variants chosen at run time from the CPU's features (never from build flags).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moe {

// Storage formats of a weight matrix. Quantized formats use ggml's block layouts, so
// that GGUF files and llama.cpp see byte-identical weights:
//   Q8_0: blocks of 32 weights: { f16 d; int8 q[32]; }        34 bytes, w = d * q, with q in
//         [-127, 127]: ggml's quantizer and quantize_rows never write -128 (q = round(x * 127 /
//         amax)), and the AVX2 decode kernel relies on it; matmulTest refuses such weights.
//   Q4_0: blocks of 32 weights: { f16 d; uint8 q[16]; }       18 bytes, w = d * (nibble - 8);
//         byte j holds weight j in its low nibble and weight j+16 in its high nibble.
enum class WType : uint8_t { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4 };

const char* wtype_name(WType t);
bool wtype_from_name(const std::string& name, WType* out);
// Bytes of one row of `cols` weights; quantized types need cols % 32 == 0 (checked by callers).
size_t row_bytes(WType t, int64_t cols);
int64_t block_cols(WType t);  // 1 for float formats, 32 for quantized ones

// Converts rows of float32 to the format (round-to-nearest-even for F16/BF16; ggml's
// Q8_0 / Q4_0 rounding for the quantized formats). dst holds rows * row_bytes(t, cols).
void quantize_rows(WType t, const float* src, int64_t rows, int64_t cols, uint8_t* dst);
void dequantize_row(WType t, const uint8_t* src, int64_t cols, float* dst);

// A row-major weight matrix W (rows, cols): row r starts at data + r * row_bytes(type, cols).
struct WMat {
  WType type;
  int64_t rows;
  int64_t cols;
  const uint8_t* data;
};

// Activations X (n, cols) prepared once for multiplication with matrices of one format
// (quantized to 8-bit blocks for Q8_0/Q4_0, converted for BF16/F16 when the kernel wants it),
// then reused for every row range and every matrix with the same `cols`.
struct Acts {
  WType for_type = WType::F32;
  int64_t n = 0;
  int64_t cols = 0;
  std::vector<uint8_t> buf;  // kernel-private layout
};
void prepare_acts(WType for_type, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out);
// The rows rows[0..n) of src as activations of their own, byte for byte what prepare_acts
// makes of those rows' inputs (each row is prepared on its own): the per-row data is copied
// and the token groups are rebuilt. Lets inputs shared by several matrices (a token routed
// to k experts) be quantized once. Throws std::out_of_range for a row outside src.
void gather_acts(const Acts& src, const int32_t* rows, int64_t n, Acts& out);

// Y[t * ldy + r] = sum_c W[r, c] * X[t, c] for rows r in [r0, r1) and every token t < X.n.
// Thread-safe for disjoint row ranges: the caller parallelises over rows (and matrices).
void matmul(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);

// Which kernel family serves calls: "scalar", "avx2" or "avx512" (with VNNI / BF16 when present).
enum class Isa : uint8_t { Scalar = 0, Avx2 = 1, Avx512 = 2 };
Isa best_isa();                 // what this CPU and OS support
Isa active_isa();               // what is in use
// Forces a variant (for tests and benchmarks); returns false if the CPU cannot run it.
bool set_isa(Isa isa);
const char* isa_name(Isa isa);

// Intel AMX for Q8_0 products of 32 tokens and more (prefill, batched decode), inside the
// avx512 family: whether the active kernels use it, and why or why not ("in use", "not
// supported by this CPU", the OS refusing the tile state, a failed start-up self-test,
// MOE_SERVE_AMX=0). The first call decides (and runs the self-test where the CPU has AMX).
bool amx_in_use();
const char* amx_status();

}  // namespace moe

// ---- Additions ----------------------------------------------------------------------

namespace moe {

class ThreadPool;

// matmul over all rows of `w`, spread over `pool` in row chunks sized for the kernels'
// row blocking (and small enough that both threads of a decode step get work).
void matmul_parallel(ThreadPool& pool, const WMat& w, const Acts& x, float* y, int64_t ldy);

// What the kernels multiply with: row t of the prepared activations converted back to
// float32 (the quantized / rounded values), dst holds x.cols floats. For tests.
void acts_dequantize(const Acts& x, int64_t t, float* dst);

// Streaming-read probe (widest ISA available): reads bytes [p, p + bytes) once and
// returns a value depending on every byte (so the loads are not optimised away).
uint64_t stream_read(const uint8_t* p, size_t bytes);

// Integer multiply-accumulate probe (the active ISA): `iters` rounds of the int8 dot
// product instructions the quantized kernels are built on (AVX2: vpmaddubsw + vpmaddwd +
// vpaddd; AVX-512: vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd + vpaddd) in
// independent chains on registers, with no loads, stores or scaling: the core's int8 MAC
// rate for those instructions, an upper bound of what a compute-bound quantized matmul
// can reach. Scalar: the portable kernels' 32-weight block dot product as the compiler
// vectorises it for the baseline ISA, on rows that stay in L1. Sets *macs to the MACs
// done; returns a value depending on every result (so the work is not optimised away).
uint64_t int8_mac_peak(int64_t iters, int64_t* macs);
// The same for the instruction mix of the Q4_0 token-group kernel where it differs (AVX2:
// four vpmaddubsw summed in int16, then one vpmaddwd + vpaddd, per 128 MACs; it can pass
// int8_mac_peak's rate). Elsewhere the Q4_0 kernels use int8_mac_peak's mix, and this is it.
uint64_t int8_mac_peak_q4_groups(int64_t iters, int64_t* macs);

// IEEE binary16 / bfloat16 conversions (round to nearest even; NaN stays NaN).
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float bf16_to_f32(uint16_t h);

// Internal: the layout of Acts::buf and the per-ISA entry points (kernels*.cc only).
namespace kdetail {

// Acts::buf, offsets relative to buf.data() (no alignment assumed, so an Acts may be copied):
//   F32, F16: float x[n][cols]
//   BF16:     uint16 x[n][cols]                 (bfloat16, round to nearest even)
//   Q8_0/Q4_0: int8  q[n][cols]                 per 32-block: q = RNE(x * 127 / amax)
//              float d[n][cols / 32]            d = amax / 127 (0 for an all-zero block)
//              int32 corr[n][cols / 32]         -(Q4_0 ? 8 : 128) * sum(q of the block): the
//                                               term VNNI's unsigned x signed product needs
//              then, only when n >= 5 (the kernels that read it need at least 5 tokens),
//              for groups of 8 tokens (G = ceil(n / 8), missing tokens zero), per
//              group g and block b, 384 bytes: the same values with tokens in lanes
//                int8  q8[4][8 tokens][8]      q8[k][t] = bytes 8k..8k+7 of token 8g+t's block
//                float d8[8 tokens][2]         its d, twice
//                int32 c8[8 tokens][2]         {its corr, 0}
//              then, only when n >= 32, for groups of 16 tokens (G16 = 2 * floor(n / 32):
//              the kernel takes them in pairs; the others are served by the 8-groups), per
//              block b and group g, 640 bytes at (b * G16 + g) * 640 (block-major: a pass
//              over the groups reads one stream): tokens in lanes, one lane per token
//                int8  q16[8][16 tokens][4]    q16[k][t] = bytes 4k..4k+3 of token 16g+t's block
//                float d16[16 tokens]          its d
//                int32 c16[16 tokens]          its corr
struct QActs {
  const int8_t* q;
  const float* d;
  const int32_t* corr;
  const uint8_t* groups;    // G * (cols / 32) * 384 bytes, group-major
  const uint8_t* groups16;  // G16 * (cols / 32) * 640 bytes, block-major
};
constexpr size_t kGroupBlockBytes = 384;
constexpr size_t kGroup16BlockBytes = 640;
size_t acts_bytes(WType t, int64_t n, int64_t cols);
QActs qacts(const Acts& a);
// Quantizes one 32-block of activations (the scalar definition every ISA reproduces exactly).
void quantize_act_block(const float* x, int8_t* q, float* d, int32_t* corr, int32_t corr_mul);
// Fills the token-interleaved groups (8 and 16 tokens) from q, d, corr (done after every
// variant's prepare).
void build_groups(Acts& a);

// Load-time packing with AVX-512 (the CPU must have it): one 32-float block into a Q8_0 /
// Q4_0 block, byte for byte the scalar definitions in kernels.cc; false (nothing written)
// for a block with a NaN or an infinity, which the scalar code then packs. BF16 values
// into floats.
bool quantize_block_avx512(WType t, const float* x, uint8_t* blk);
void bf16_to_f32_avx512(const uint8_t* src, int64_t n, float* dst);

using MatmulFn = void (*)(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);
using PrepareFn = void (*)(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out);
using StreamFn = uint64_t (*)(const uint8_t* p, size_t bytes);

void matmul_scalar(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);
void prepare_scalar(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out);
void matmul_avx2(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);
void prepare_avx2(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out);
uint64_t stream_avx2(const uint8_t* p, size_t bytes);
uint64_t int8_peak_avx2(int64_t iters, int64_t* macs);
uint64_t int8_peak_q4_groups_avx2(int64_t iters, int64_t* macs);
void matmul_avx512(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);
void prepare_avx512(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out);
uint64_t stream_avx512(const uint8_t* p, size_t bytes);
uint64_t int8_peak_avx512(int64_t iters, int64_t* macs);

// Intel AMX (kernels_amx.cc), reached only from AVX-512 code or after can_run(Avx512):
// the Q8_0 product for the tokens [0, n / 32 * 32) (every 16-token group of x), rows
// [r0, r1); bitwise the VNNI kernel's results for those tokens. amx_q8_active() decides
// once (CPU and OS support, MOE_SERVE_AMX=0 to turn it off, a self-test and a timing
// against the VNNI kernel) whether matmul_avx512 uses it; amx_q8_status() says why or why not.
void matmul_q8_amx(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);
bool amx_q8_built();  // false when the compiler had no AMX support (matmul_q8_amx then does nothing)
// kernels_amx_runtime.cc:
bool amx_q8_active();
const char* amx_q8_status();
// The same kernel with the tile instructions modelled in C++ (kernels_amx_emu.cc): any
// CPU, for tests only.
void matmul_q8_amx_emulated(const WMat& w, const Acts& x, int64_t r0, int64_t r1, float* y, int64_t ldy);

}  // namespace kdetail
}  // namespace moe
