// AMX prefill for the int8 layouts (bitmap-int8, dense-int8): each thread converts a
// chunk of column groups to the bf16 layouts, every kept weight as bf16(q * scale), and
// runs the AMX-BF16 kernel over the chunk; decode-sized calls (M <= kDecodeRows) go to
// the int8 streaming kernel instead. The conversion is O(weights) next to the O(M x
// weights) tile products: at M = 64 and 256 int8 prefill ran at 0.61-1.04x the bf16
// kernel's speed, where int8 -> fp32 FMA panels took 8-12x the bf16 time (2-core AMX
// Xeon, bench/results/int8_prefill_m64-m256_xeon-amx.json).
//
// bf16(q * scale) rounds each weight once more (a relative 2^-9 at most, next to int8's
// own rounding of up to half a step): prefill logits differ from decode's exact fp32
// dequantization in the last bits, as bf16 prefill and decode differ in sum order.
//
// No target flags here: the AVX-512 converter lives in kernel_amx.cpp (flagged); the
// buffers below are std::vector, whose inline code must not be compiled for AMX.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace sparamx {
namespace {

constexpr int64_t kChunkGroups = 64;  // column groups converted at a time (1024 outputs)

using ConvertFn = void (*)(const LinearArgs&, int64_t, int64_t, uint16_t*);

// The AMX kernel's view of groups [g0, g1) of `a` converted into `vals` (and, sparse,
// their offsets rebased into `offs`): group g0 becomes group 0, so the output, bias
// and n are shifted to match.
LinearArgs chunk_args(const LinearArgs& a, int64_t g0, int64_t g1, std::vector<uint16_t>& vals,
                      std::vector<int64_t>& offs) {
  LinearArgs b = a;
  const int64_t col0 = g0 * kGroupCols, ng = g1 - g0;
  b.qvalues = nullptr;
  b.scales = nullptr;
  b.k_blocks = 0;
  b.n = a.n - col0;
  b.bias = a.bias ? a.bias + col0 : nullptr;
  b.y = a.y_bf16 ? static_cast<void*>(static_cast<uint16_t*>(a.y) + col0)
                 : static_cast<void*>(static_cast<float*>(a.y) + col0);
  if (a.bitmap) {
    const int64_t nnz = a.offsets[g1] - a.offsets[g0];
    vals.resize(static_cast<size_t>(nnz + kValuesPad));
    std::fill(vals.begin() + nnz, vals.end(), uint16_t{0});  // the kernels' read-past pad
    offs.resize(static_cast<size_t>(ng + 1));
    for (int64_t i = 0; i <= ng; ++i) offs[i] = a.offsets[g0 + i] - a.offsets[g0];
    b.bitmap = a.bitmap + g0 * a.k_pairs;
    b.offsets = offs.data();
  } else {
    vals.resize(static_cast<size_t>(ng * a.k_pairs * kUnitVals));
  }
  b.values = vals.data();
  return b;
}

void via_bf16(const LinearArgs& a, int64_t g_begin, int64_t g_end, ConvertFn convert,
              void (*tiles)(const LinearArgs&, int64_t, int64_t),
              void (*streams)(const LinearArgs&, int64_t, int64_t)) {
  if (a.m <= kDecodeRows) return streams(a, g_begin, g_end);
  thread_local std::vector<uint16_t> vals;
  thread_local std::vector<int64_t> offs;
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kChunkGroups) {
    const int64_t g1 = std::min(g_end, g0 + kChunkGroups);
    const LinearArgs b = chunk_args(a, g0, g1, vals, offs);
    convert(a, g0, g1, vals.data());
    tiles(b, 0, g1 - g0);
  }
}

}  // namespace

void int8_to_bf16_portable(const LinearArgs& a, int64_t g0, int64_t g1, uint16_t* out) {
  const int8_t* q = a.qvalues + (a.bitmap ? a.offsets[g0] : g0 * a.k_pairs * kUnitVals);
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t p = 0; p < a.k_pairs; ++p) {
      const float* s = a.scales + (g * a.k_blocks + p / kQBlockPairs) * kGroupCols;
      const uint32_t bits = a.bitmap ? a.bitmap[g * a.k_pairs + p] : ~0u;
      for (int e = 0; e < kUnitVals; ++e)
        if (bits >> e & 1u) *out++ = float_to_bf16(static_cast<float>(*q++) * s[e >> 1]);
    }
}

void linear_int8_amx_emulated(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  via_bf16(a, g_begin, g_end, int8_to_bf16_portable, linear_amx_emulated, linear_int8_portable);
}

void linear_int8_amx(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  via_bf16(a, g_begin, g_end, int8_to_bf16_avx512, linear_amx, linear_int8_avx512);
}

}  // namespace sparamx
