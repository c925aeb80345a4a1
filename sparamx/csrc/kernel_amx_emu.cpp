// sparamx::linear_amx_emulated: the AMX-BF16 kernel (kernel_amx_impl.h) on the plain-C++
// tile emulation of amx_tiles.h. Runs on any CPU, so the AMX kernel's tiling and
// indexing are tested everywhere; it is slow and meant for tests only.
#define SPARAMX_AMX_EMULATE
#include <cstdint>

#include "amx_tiles.h"
#include "kernels.h"

namespace sparamx {
namespace amx_emu {

// Sparse B tile, scalar: unit i's kept values go to its set bit positions, in order.
inline void decompress_b_tile(const uint32_t* bits, const uint16_t*& v, uint16_t* out) {
  for (int i = 0; i < 16; ++i) {  // out: [16 units][32 bf16]
    const uint32_t b = bits[i];
    for (int e = 0; e < kUnitVals; ++e) out[i * kUnitVals + e] = (b >> e & 1u) ? *v++ : 0;
  }
}

inline void store_row(const LinearArgs& a, int64_t g, int64_t r, const float* acc) {
  store_group_row(a, g, r, acc);
}

}  // namespace amx_emu
}  // namespace sparamx

#define SPARAMX_AMX_KERNEL_NAME linear_amx_emulated
#include "kernel_amx_impl.h"
