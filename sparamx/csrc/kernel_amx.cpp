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

}  // namespace amx_hw
}  // namespace sparamx

#define SPARAMX_AMX_KERNEL_NAME linear_amx
#include "kernel_amx_impl.h"

#pragma GCC pop_options
