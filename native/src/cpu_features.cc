#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace moe {
namespace {

#if defined(__x86_64__) || defined(__i386__)

struct Regs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

Regs cpuid(unsigned leaf, unsigned subleaf) {
  Regs r;
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
  return r;
}

// Only valid when CPUID.1:ECX.OSXSAVE is set; xgetbv faults otherwise. Written as
// inline asm so this file needs no -mxsave.
unsigned long long xgetbv0() {
  unsigned eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

bool bit(unsigned reg, int n) { return ((reg >> n) & 1u) != 0; }

CpuFeatures detect() {
  CpuFeatures f;
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 1) return f;
  const Regs l1 = cpuid(1, 0);
  Regs l7, l7s1;
  if (max_leaf >= 7) {
    l7 = cpuid(7, 0);
    if (l7.eax >= 1) l7s1 = cpuid(7, 1);
  }

  const bool osxsave = bit(l1.ecx, 27);
  const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;                 // XMM + YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;          // XTILECFG + XTILEDATA

  f.sse42 = bit(l1.ecx, 20);
  f.avx = os_avx && bit(l1.ecx, 28);
  f.fma = f.avx && bit(l1.ecx, 12);
  f.f16c = f.avx && bit(l1.ecx, 29);
  f.avx2 = f.avx && bit(l7.ebx, 5);

  f.avx512f = os_avx512 && f.avx2 && f.fma && f.f16c && bit(l7.ebx, 16);
  f.avx512bw = f.avx512f && bit(l7.ebx, 30);
  f.avx512vl = f.avx512f && bit(l7.ebx, 31);
  f.avx512vnni = f.avx512f && bit(l7.ecx, 11);
  f.avx512bf16 = f.avx512f && bit(l7s1.eax, 5);
  f.avx512fp16 = f.avx512f && bit(l7.edx, 23);

  f.amx_tile = os_amx && bit(l7.edx, 24);
  f.amx_int8 = f.amx_tile && bit(l7.edx, 25);
  f.amx_bf16 = f.amx_tile && bit(l7.edx, 22);
  return f;
}

#else

CpuFeatures detect() { return CpuFeatures(); }

#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();  // C++11 magic statics: thread-safe
  return features;
}

}  // namespace moe
