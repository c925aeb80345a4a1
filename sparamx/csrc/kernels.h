// The bitmap-bf16 packed weight format and the per-ISA kernel entry points.
//
// Format (version 1), for a weight W[N, K] (out x in), padded with zeros to
// Np = ceil(N / 16) * 16 rows and Kp = ceil(K / 32) * 32 columns:
//   column group g  = output rows 16g .. 16g+15           (G = Np / 16 groups)
//   K-pair p        = input columns 2p, 2p+1              (P = Kp / 2 pairs)
//   unit (g, p)     = 32 bf16 in VNNI order: element 2c+j = W[16g+c, 2p+j]
//                     (one row of an AMX B tile, one zmm operand of vdpbf16ps)
//   bitmap[g, p]    = uint32, bit 2c+j set iff that element is kept
//   values          = kept bf16 of each unit in bit order, units in (g, p) order,
//                     followed by kValuesPad zeros so a 64-byte load of the last
//                     unit stays inside the buffer
//   offsets[g]      = int64 start of group g in values; offsets[G] = nnz
// The dense layout ("dense-bf16") stores every unit whole: values[G, P, 32], no bitmap.
//
// Int8 layouts ("bitmap-int8", "dense-int8"): the same units, bitmap, offsets and dense
// order, with int8 values q (|q| <= 127, symmetric) and fp32 scales[G, KB, 16], one per
// output row and block of kQBlockPairs K-pairs (128 input columns; KB = ceil(Kp / 128)):
//   W[16g+c, k] = q * scales[g, k / 128, c]
// Scales are grouped by column group, like the values, so a thread starting at group g
// reads one contiguous run of them. The sparse values end in kValuesPadI8 zero bytes.
//
// Kernel entry points take raw pointers (no torch headers) so that each ISA's source
// can be compiled with its own target flags without leaking them into torch's inline
// functions. Each computes the output column groups [g_begin, g_end); disjoint ranges
// may run on different threads.
#pragma once
#include <cstdint>

namespace sparamx {

constexpr int kGroupCols = 16;  // output features per column group
constexpr int kUnitVals = 32;   // bf16 per unit: 16 columns x one K-pair
constexpr int kKAlign = 32;     // K is padded to a multiple of this (one AMX tile depth)
constexpr int kValuesPad = 32;  // zero bf16 after the last kept value
// Int8 scales: fp32, per 128 input columns. At 4 bytes per 128 weights they add 0.03
// bytes per weight (5% of a 50%-sparse int8 stream; a 64-column block would double it)
// and need no conversion in the kernels; bf16 scales would add a 2^-9 relative error to
// every weight of the block, half the worst int8 rounding error again, and fp16 ones
// underflow for the small scales of small-weight rows.
constexpr int kQBlockPairs = 64;  // K-pairs per int8 scale block (128 input columns)
constexpr int kValuesPadI8 = 64;  // zero int8 after the last kept value (a 64-byte load)
// Rows of x up to which AVX-512 is preferred over AMX when both exist (ops.cpp), and up
// to which the AMX int8 kernel streams int8 instead of converting (kernel_int8_amx.cpp).
// AVX-512's streaming decode path covers M <= 4; above that it decompresses panels,
// which AMX does faster: on a 16-core AMX Xeon (bench/amx_device.sh), 4096x4096 at
// M = 16 took 10.2 ms (dense) and 11.3 ms (50% sparse) on AVX-512 vs 2.7 and 4.2 ms on
// AMX, 1 thread.
constexpr int64_t kDecodeRows = 4;

struct LinearArgs {
  const uint16_t* x;       // activations, bf16 bits, [M, 2 * k_pairs], zero-padded past K
  int64_t x_stride;        // elements between rows of x
  int64_t m;               // rows of x
  int64_t k_pairs;         // P = Kp / 2
  int64_t n;               // true output features (<= 16 * G)
  const uint32_t* bitmap;  // [G, P]; nullptr for the dense layout
  const uint16_t* values;  // sparse: packed values; dense: [G, P, 32]
  const int64_t* offsets;  // [G + 1]; sparse layout only
  const float* bias;       // [n] or nullptr
  void* y;                 // output [M, n], bf16 or fp32
  int64_t y_stride;        // elements between rows of y
  bool y_bf16;             // y is bf16 (else fp32)
  // Int8 layouts only (the linear_int8_* kernels); values is then unused.
  const int8_t* qvalues = nullptr;  // sparse: packed int8; dense: [G, P, 32]
  const float* scales = nullptr;    // [G, k_blocks, 16]
  int64_t k_blocks = 0;             // ceil(k_pairs / kQBlockPairs)
};

void linear_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_avx2(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_avx512(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_amx(const LinearArgs& a, int64_t g_begin, int64_t g_end);
// The AMX kernel built on the plain-C++ tile emulation (any CPU; for tests).
void linear_amx_emulated(const LinearArgs& a, int64_t g_begin, int64_t g_end);
// Int8 layouts (a.qvalues, a.scales).
void linear_int8_portable(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_int8_avx2(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_int8_avx512(const LinearArgs& a, int64_t g_begin, int64_t g_end);
// AMX (kernel_int8_amx.cpp): M > 4 converts chunks of groups to bf16 and runs the AMX
// kernel (real or emulated tiles); M <= 4 runs linear_int8_avx512 / _portable.
void linear_int8_amx(const LinearArgs& a, int64_t g_begin, int64_t g_end);
void linear_int8_amx_emulated(const LinearArgs& a, int64_t g_begin, int64_t g_end);
// Groups [g0, g1) of an int8 layout as the bf16 layout's values, each weight
// bf16(q * scale): sparse, the kept values in order; dense, [g1 - g0][P][32].
void int8_to_bf16_portable(const LinearArgs& a, int64_t g0, int64_t g1, uint16_t* out);
void int8_to_bf16_avx512(const LinearArgs& a, int64_t g0, int64_t g1, uint16_t* out);

// bf16 <-> fp32 helpers shared by the plain-C++ kernels.
inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Store one column group's 16 fp32 results of row r (plus bias), clipped to n.
inline void store_group_row(const LinearArgs& a, int64_t g, int64_t r, const float* acc) {
  const int64_t col0 = g * kGroupCols;
  const int64_t cols = (a.n - col0) < kGroupCols ? (a.n - col0) : kGroupCols;
  for (int64_t c = 0; c < cols; ++c) {
    float v = acc[c] + (a.bias ? a.bias[col0 + c] : 0.f);
    if (a.y_bf16)
      static_cast<uint16_t*>(a.y)[r * a.y_stride + col0 + c] = float_to_bf16(v);
    else
      static_cast<float*>(a.y)[r * a.y_stride + col0 + c] = v;
  }
}

}  // namespace sparamx
