// Run-time CPU feature detection (cpuid + xgetbv). Kernels built with wider ISA
// flags (see native/CMakeLists.txt) are dispatched on these flags only.
#pragma once

namespace moe {

// A flag is true only when the CPU has the instructions AND the OS saves the
// register state they use (XCR0), AND every flag it builds on is true too
// (avx2 => avx, avx512bw => avx512f => avx2 + fma + f16c, amxInt8 => amxTile), so a
// kernel needs to test one flag.
struct CpuFeatures {
  bool sse42 = false;
  bool avx = false;
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
  bool avx512fp16 = false;
  // AMX: hardware + XCR0 only. On Linux a process must still request permission for
  // the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) before using tiles.
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
};

// Detected once; cheap to call afterwards. Thread-safe.
const CpuFeatures& cpu_features();

}  // namespace moe
