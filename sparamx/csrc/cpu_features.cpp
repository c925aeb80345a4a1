// CPUID / XGETBV feature detection. Compiled without ISA flags: it must run anywhere.
#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SPARAMX_X86 1
#endif

namespace sparamx {
namespace {

#ifdef SPARAMX_X86
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux gates AMX tile data behind a per-process permission (kernel >= 5.16).
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  f.x86 = true;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  f.fma = (c >> 12) & 1;
  f.popcnt = (c >> 23) & 1;
  f.f16c = (c >> 29) & 1;
  f.os_avx = (xcr0 & 0x6) == 0x6;  // SSE, AVX (ymm) state
  f.os_avx512 = (xcr0 & 0xe6) == 0xe6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = (b >> 5) & 1;
  f.bmi2 = (b >> 8) & 1;
  f.avx512f = (b >> 16) & 1;
  f.avx512dq = (b >> 17) & 1;
  f.avx512bw = (b >> 30) & 1;
  f.avx512vl = (b >> 31) & 1;
  f.avx512_vbmi = (c >> 1) & 1;
  f.avx512_vbmi2 = (c >> 6) & 1;
  f.amx_bf16 = (d >> 22) & 1;
  f.amx_tile = (d >> 24) & 1;
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = (a >> 5) & 1;
  const bool os_tile = ((xcr0 >> 17) & 3) == 3;  // XTILECFG, XTILEDATA
  f.os_amx = f.amx_tile && os_tile && request_amx_permission();
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace sparamx
