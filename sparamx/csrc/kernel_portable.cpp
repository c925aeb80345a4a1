// Portable C++ kernel (any CPU): the reference the ISA kernels are measured against,
// and the fallback where neither AVX-512-BF16 nor AMX exists.
//
// Each unit is decompressed into 32 floats once and applied to every row of x, so the
// work per kept weight is one multiply-add per row.
#include "kernels.h"

namespace sparamx {

void linear_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  float w[kUnitVals];
  float acc[kGroupCols];
  const int64_t P = a.k_pairs;
  // Rows of x are processed in blocks so the accumulators stay small and the
  // decompressed units of a group are reused across the block.
  constexpr int64_t kRowBlock = 8;
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t r0 = 0; r0 < a.m; r0 += kRowBlock) {
      const int64_t r1 = (r0 + kRowBlock) < a.m ? (r0 + kRowBlock) : a.m;
      float accs[kRowBlock][kGroupCols] = {};
      const uint16_t* v =
          a.bitmap ? a.values + a.offsets[g] : a.values + g * P * kUnitVals;
      for (int64_t p = 0; p < P; ++p) {
        if (a.bitmap) {
          uint32_t bits = a.bitmap[g * P + p];
          for (int i = 0; i < kUnitVals; ++i) {
            if (bits >> i & 1u) {
              w[i] = bf16_to_float(*v++);
            } else {
              w[i] = 0.f;
            }
          }
          if (bits == 0) continue;
        } else {
          for (int i = 0; i < kUnitVals; ++i) w[i] = bf16_to_float(v[i]);
          v += kUnitVals;
        }
        for (int64_t r = r0; r < r1; ++r) {
          const float x0 = bf16_to_float(a.x[r * a.x_stride + 2 * p]);
          const float x1 = bf16_to_float(a.x[r * a.x_stride + 2 * p + 1]);
          float* acc_r = accs[r - r0];
          for (int c = 0; c < kGroupCols; ++c) acc_r[c] += w[2 * c] * x0 + w[2 * c + 1] * x1;
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        for (int c = 0; c < kGroupCols; ++c) acc[c] = accs[r - r0][c];
        store_group_row(a, g, r, acc);
      }
    }
  }
}

// Int8 layouts: per scale block, sum_k q * x in fp32 (each product exact), then times
// the block's 16 row scales into the row's total.
void linear_int8_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  float w[kUnitVals];
  float acc[kGroupCols];
  const int64_t P = a.k_pairs;
  constexpr int64_t kRowBlock = 8;
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t r0 = 0; r0 < a.m; r0 += kRowBlock) {
      const int64_t r1 = (r0 + kRowBlock) < a.m ? (r0 + kRowBlock) : a.m;
      float tot[kRowBlock][kGroupCols] = {};
      const int8_t* v =
          a.bitmap ? a.qvalues + a.offsets[g] : a.qvalues + g * P * kUnitVals;
      for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
        float blk[kRowBlock][kGroupCols] = {};
        const int64_t p_end = (kb + 1) * kQBlockPairs < P ? (kb + 1) * kQBlockPairs : P;
        for (int64_t p = kb * kQBlockPairs; p < p_end; ++p) {
          if (a.bitmap) {
            const uint32_t bits = a.bitmap[g * P + p];
            if (bits == 0) continue;
            for (int i = 0; i < kUnitVals; ++i) w[i] = (bits >> i & 1u) ? float(*v++) : 0.f;
          } else {
            for (int i = 0; i < kUnitVals; ++i) w[i] = float(v[i]);
            v += kUnitVals;
          }
          for (int64_t r = r0; r < r1; ++r) {
            const float x0 = bf16_to_float(a.x[r * a.x_stride + 2 * p]);
            const float x1 = bf16_to_float(a.x[r * a.x_stride + 2 * p + 1]);
            float* blk_r = blk[r - r0];
            for (int c = 0; c < kGroupCols; ++c) blk_r[c] += w[2 * c] * x0 + w[2 * c + 1] * x1;
          }
        }
        const float* s = a.scales + (g * a.k_blocks + kb) * kGroupCols;
        for (int64_t r = r0; r < r1; ++r)
          for (int c = 0; c < kGroupCols; ++c) tot[r - r0][c] += blk[r - r0][c] * s[c];
      }
      for (int64_t r = r0; r < r1; ++r) {
        for (int c = 0; c < kGroupCols; ++c) acc[c] = tot[r - r0][c];
        store_group_row(a, g, r, acc);
      }
    }
  }
}

}  // namespace sparamx
