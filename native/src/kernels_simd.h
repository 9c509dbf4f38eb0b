// Helpers shared by the SIMD kernel files (kernels_avx2.cc, kernels_avx512.cc): the
// software prefetch of weight streams, and the row loop of activation quantization.
// Everything here has internal linkage: each kernel file is compiled with its own
// instruction-set flags, and an inline function with external linkage could be merged
// across them by the linker (an AVX-512 copy then called on an AVX2-only CPU).
#pragma once

#include <xmmintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace moe {
namespace kdetail {
namespace {

enum class Hint { T0, T1, Nta };

template <Hint H>
inline void prefetch_line(const uint8_t* p) {
  if constexpr (H == Hint::T0) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  else if constexpr (H == Hint::T1) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
  else _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_NTA);
}

// The region [tile + ahead, tile + ahead + tile_bytes) clamped to `end`, issued in
// ascending 64-byte lines as the tile advances: upto(k) has every line below region
// byte k prefetched. ahead == 0 disables it.
struct Prefetch {
  const uint8_t* next;
  const uint8_t* base;
  const uint8_t* end;
  Prefetch(const uint8_t* tile, size_t tile_bytes, size_t ahead, const uint8_t* call_end) {
    base = tile + ahead;
    end = ahead == 0 ? base : std::min(call_end, base + tile_bytes);
    next = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(base) & ~uintptr_t{63});
  }
  template <Hint H>
  inline void upto(size_t bytes) {
    const uint8_t* u = std::min(end, base + bytes);
    for (; next < u; next += 64) prefetch_line<H>(next);
  }
};

// The start of a call's rows, [begin, begin + ahead) clamped to `end`: the lines no tile
// prefetches (each prefetches `ahead` beyond itself). Issued at once, so that they load in
// parallel: the engine's expert matmuls are many calls of ~64 KB, where a cold first tile
// cost ~25% of the time (measured with one thread: 21 -> 27 GB/s).
inline void prefetch_start(const uint8_t* begin, size_t ahead, const uint8_t* end) {
  const uint8_t* e = std::min(end, begin + ahead);
  for (const uint8_t* p = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63}); p < e;
       p += 64)
    prefetch_line<Hint::T0>(p);
}

// How far ahead a tile of `tile_bytes` prefetches: a whole number (>= 1) of tiles, as
// close to `target` bytes as possible.
inline size_t ahead_for(size_t tile_bytes, size_t target) {
  if (tile_bytes == 0) return 0;
  return std::max<size_t>(1, (target + tile_bytes / 2) / tile_bytes) * tile_bytes;
}

// Q8_0 / Q4_0 activations: quantize_row(x, nb, q, d, corr, corr_mul) for each of the n
// rows, into the layout of QActs (kernels.h).
template <typename QuantizeRow>
inline void quantize_act_rows(WType t, const float* x, int64_t n, int64_t cols, int64_t ldx, Acts& out, QuantizeRow quantize_row) {
  const QActs a = qacts(out);
  const int64_t nb = cols / 32;
  const int32_t mul = t == WType::Q4_0 ? 8 : 128;
  for (int64_t i = 0; i < n; ++i)
    quantize_row(x + i * ldx, nb, const_cast<int8_t*>(a.q) + i * cols, const_cast<float*>(a.d) + i * nb,
                 const_cast<int32_t*>(a.corr) + i * nb, mul);
}

}  // namespace
}  // namespace kdetail
}  // namespace moe
