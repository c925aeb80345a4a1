// Portable C++ kernel (any CPU): the reference the ISA kernels are measured against,
// and the fallback where neither AVX-512-BF16 nor AMX exists.
//
// Each unit is decompressed into 32 floats once and applied to every row of x, so the
// work per kept weight is one multiply-add per row.
#include "kernels.h"

namespace sparamx {

namespace {

constexpr int64_t kRowBlock = 8;  // rows of x per block: small accumulators, units reused

// Unit p of group g as 32 floats in w (zeros at clear bits), v advanced past its
// values; false for a sparse unit that keeps nothing (no products to add).
template <class T, class ToFloat>
inline bool load_unit(const LinearArgs& a, int64_t g, int64_t p, const T*& v, float* w,
                      ToFloat to_float) {
  if (!a.bitmap) {
    for (int i = 0; i < kUnitVals; ++i) w[i] = to_float(v[i]);
    v += kUnitVals;
    return true;
  }
  const uint32_t bits = a.bitmap[g * a.k_pairs + p];
  if (bits == 0) return false;
  for (int i = 0; i < kUnitVals; ++i) w[i] = (bits >> i & 1u) ? to_float(*v++) : 0.f;
  return true;
}

// acc[r - r0] += the unit's products with K-pair p of rows r0 .. r1-1 of x.
inline void add_unit(const LinearArgs& a, const float* w, int64_t p, int64_t r0, int64_t r1,
                     float (*acc)[kGroupCols]) {
  for (int64_t r = r0; r < r1; ++r) {
    const float x0 = bf16_to_float(a.x[r * a.x_stride + 2 * p]);
    const float x1 = bf16_to_float(a.x[r * a.x_stride + 2 * p + 1]);
    float* acc_r = acc[r - r0];
    for (int c = 0; c < kGroupCols; ++c) acc_r[c] += w[2 * c] * x0 + w[2 * c + 1] * x1;
  }
}

}  // namespace

void linear_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  float w[kUnitVals];
  const int64_t P = a.k_pairs;
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t r0 = 0; r0 < a.m; r0 += kRowBlock) {
      const int64_t r1 = (r0 + kRowBlock) < a.m ? (r0 + kRowBlock) : a.m;
      float accs[kRowBlock][kGroupCols] = {};
      const uint16_t* v = a.bitmap ? a.values + a.offsets[g] : a.values + g * P * kUnitVals;
      for (int64_t p = 0; p < P; ++p)
        if (load_unit(a, g, p, v, w, bf16_to_float)) add_unit(a, w, p, r0, r1, accs);
      for (int64_t r = r0; r < r1; ++r) store_group_row(a, g, r, accs[r - r0]);
    }
  }
}

// Int8 layouts: per scale block, sum_k q * x in fp32 (each product exact), then times
// the block's 16 row scales into the row's total.
void linear_int8_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  float w[kUnitVals];
  const int64_t P = a.k_pairs;
  const auto to_float = [](int8_t q) { return static_cast<float>(q); };
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int64_t r0 = 0; r0 < a.m; r0 += kRowBlock) {
      const int64_t r1 = (r0 + kRowBlock) < a.m ? (r0 + kRowBlock) : a.m;
      float tot[kRowBlock][kGroupCols] = {};
      const int8_t* v = a.bitmap ? a.qvalues + a.offsets[g] : a.qvalues + g * P * kUnitVals;
      for (int64_t kb = 0; kb < a.k_blocks; ++kb) {
        float blk[kRowBlock][kGroupCols] = {};
        const int64_t p_end = (kb + 1) * kQBlockPairs < P ? (kb + 1) * kQBlockPairs : P;
        for (int64_t p = kb * kQBlockPairs; p < p_end; ++p)
          if (load_unit(a, g, p, v, w, to_float)) add_unit(a, w, p, r0, r1, blk);
        const float* s = a.scales + (g * a.k_blocks + kb) * kGroupCols;
        for (int64_t r = r0; r < r1; ++r)
          for (int c = 0; c < kGroupCols; ++c) tot[r - r0][c] += blk[r - r0][c] * s[c];
      }
      for (int64_t r = r0; r < r1; ++r) store_group_row(a, g, r, tot[r - r0]);
    }
  }
}

}  // namespace sparamx
