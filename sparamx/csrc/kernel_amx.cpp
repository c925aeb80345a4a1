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

// int8 -> bf16 for the AMX int8 prefill (kernel_int8_amx.cpp): per unit, the kept int8
// are expanded to their bit positions (vpexpandb), widened to fp32, multiplied by their
// column's scale (lane 2c + j holds column c), rounded to bf16 (RNE, as float_to_bf16)
// and, sparse, compressed back to the kept positions (vpcompressw). The 32-byte load may
// read past a unit's values; the format pads them with kValuesPadI8 zero bytes.
void int8_to_bf16_avx512(const LinearArgs& a, int64_t g0, int64_t g1, uint16_t* out) {
  const int8_t* q = a.qvalues + (a.bitmap ? a.offsets[g0] : g0 * a.k_pairs * kUnitVals);
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t p0 = 0; p0 < a.k_pairs; p0 += kQBlockPairs) {
      const __m512 s = _mm512_loadu_ps(a.scales + (g * a.k_blocks + p0 / kQBlockPairs) * 16);
      const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s);
      const __m512 s_hi = _mm512_permutexvar_ps(hi_idx, s);
      const int64_t p1 = p0 + kQBlockPairs < a.k_pairs ? p0 + kQBlockPairs : a.k_pairs;
      for (int64_t p = p0; p < p1; ++p) {
        const uint32_t bits = a.bitmap ? a.bitmap[g * a.k_pairs + p] : ~0u;
        __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        if (a.bitmap) w = _mm256_maskz_expand_epi8(bits, w);
        const __m512 f_lo = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(w))), s_lo);
        const __m512 f_hi = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(w, 1))), s_hi);
        const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(f_hi, f_lo);
        const int kept = __builtin_popcount(bits);
        if (a.bitmap) {
          _mm512_mask_compressstoreu_epi16(out, bits, b);
        } else {
          _mm512_storeu_si512(out, b);
        }
        out += kept;
        q += kept;
      }
    }
}

}  // namespace sparamx

#define SPARAMX_AMX_KERNEL_NAME linear_amx
#include "kernel_amx_impl.h"

#pragma GCC pop_options
