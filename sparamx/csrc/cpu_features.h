// Run-time CPU feature detection (CPUID + XGETBV) and the Linux AMX permission request.
#pragma once
#include <string>

namespace sparamx {

struct CpuFeatures {
  bool x86 = false;
  bool avx2 = false, fma = false, f16c = false, bmi2 = false, popcnt = false;
  bool os_avx = false;     // OS saves ymm state (XCR0)
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vbmi = false, avx512_vbmi2 = false;
  bool os_avx512 = false;  // OS saves zmm/opmask state (XCR0)
  bool amx_tile = false, amx_bf16 = false;
  bool os_amx = false;     // XCR0 tile state enabled and arch_prctl permission granted
  bool can_avx2() const { return avx2 && fma && f16c && bmi2 && popcnt && os_avx; }
  bool can_avx512() const {
    return avx512f && avx512bw && avx512vl && avx512dq && avx512_bf16 && avx512_vbmi && avx512_vbmi2 &&
           os_avx512 &&
           can_avx2();
  }
  bool can_amx() const { return amx_tile && amx_bf16 && os_amx && can_avx512(); }
};

// Detected once (thread-safe static); the AMX permission is requested on first call.
const CpuFeatures& cpu_features();

}  // namespace sparamx
