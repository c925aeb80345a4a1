// Non-x86 builds: the x86 kernels are not compiled; ops.cpp never selects them there.
#include <cstdlib>

#include "kernels.h"

namespace sparamx {
void linear_avx2(const LinearArgs&, int64_t, int64_t) { std::abort(); }
void linear_avx512(const LinearArgs&, int64_t, int64_t) { std::abort(); }
void linear_amx(const LinearArgs&, int64_t, int64_t) { std::abort(); }
void linear_int8_avx2(const LinearArgs&, int64_t, int64_t) { std::abort(); }
void linear_int8_avx512(const LinearArgs&, int64_t, int64_t) { std::abort(); }
void int8_to_bf16_avx512(const LinearArgs&, int64_t, int64_t, uint16_t*) { std::abort(); }
}  // namespace sparamx
