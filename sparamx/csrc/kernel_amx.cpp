// sparamx::linear_amx: the AMX-BF16 kernel (kernel_amx_impl.h) on the real tile
// registers. Only called when CPUID reports AMX-BF16 and the OS granted the tile state
// (arch_prctl(ARCH_REQ_XCOMP_PERM), done by the dispatcher).
//
// Everything shared with other translation units (kernels.h and the standard headers it
// pulls in) is included BEFORE the target pragma: inline functions compiled after it
// may contain AMX/AVX-512 instructions, and the linker keeps only one copy of each
// inline function for the whole library. No torch headers here for the same reason.
#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,popcnt")
#include <immintrin.h>

#include "amx_tiles.h"
#include "expand_avx512.h"

namespace sparamx {
namespace amx_hw {

// Sparse B tile: each unit's kept values are expanded to their bit positions with one
// register-form expand (AMX CPUs all have AVX-512 VBMI2). The 64-byte load may read past
// the unit's values; the format pads `values` so it stays inside the buffer.
inline void decompress_b_tile(const uint32_t* bits, const uint16_t*& v, uint16_t* out) {
  for (int i = 0; i < 16; ++i) {  // out: [16 units][32 bf16], 64-byte aligned
    const __m512i kept = _mm512_loadu_si512(v);
    _mm512_store_si512(out + i * kUnitVals, sparamx_expand_unit(bits[i], kept));
    v += __builtin_popcount(bits[i]);
  }
}

// One column group's 16 fp32 results of row r, plus bias, stored as bf16 or fp32 with
// masked vector stores (clipped to n). The scalar store_group_row costs a few ns per
// output, which is not small next to the tile products when K is small (SmolLM2's
// K = 576: 576 multiply-adds per output).
inline void store_row(const LinearArgs& a, int64_t g, int64_t r, const float* acc) {
  const int64_t col0 = g * kGroupCols;
  const int64_t cols = a.n - col0 < kGroupCols ? a.n - col0 : kGroupCols;
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  __m512 v = _mm512_loadu_ps(acc);
  if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.bias + col0));
  if (a.y_bf16) {
    auto* y = static_cast<uint16_t*>(a.y) + r * a.y_stride + col0;
    _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(a.y) + r * a.y_stride + col0, mask, v);
  }
}

}  // namespace amx_hw
}  // namespace sparamx

#define SPARAMX_AMX_KERNEL_NAME linear_amx
#include "kernel_amx_impl.h"

#pragma GCC pop_options
