// AVX-512-BF16 kernel (Zen 4, Cooper Lake, Sapphire Rapids and later).
//
// Decode (M <= kDecodeMaxRows): the compressed bytes are streamed once. Per unit, a
// plain 64-byte load is expanded in registers with the unit's bitmap (vpexpandw, in
// the dependency-free form of expand_avx512.h) and
// multiplied into one fp32 accumulator per row with vdpbf16ps. Four column groups are
// interleaved so that four independent value-pointer chains keep loads in flight
// (with one chain each address waits on the previous unit's popcount). The four
// groups come from the four quarters of the thread's range of groups, so each chain
// walks one long contiguous stretch of values and bitmap words: group g + 1's bytes
// follow group g's. With adjacent groups instead, three of the four streams restarted
// at every block, and small matrices (K = 576, 1536) streamed from DRAM at 10-11 GB/s
// instead of 17-19 (1 thread, 50%, measured on Zen 4).
//
// Prefill (larger M): each group's units are decompressed once per K-chunk into a
// dense panel that stays in L1/L2 and is reused by every block of rows.
//
// Only raw-pointer code lives here, compiled for AVX-512. Headers are included before
// the target pragma and no std:: template is instantiated after it: an inline function
// built for AVX-512 here could be the copy the linker keeps for every caller, and crash
// the portable path on a CPU without AVX-512.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx512vbmi2,popcnt")
#include <immintrin.h>

#include "decode_streams.h"
#include "expand_avx512.h"

namespace sparamx {
namespace {

constexpr int64_t kDecodeMaxRows = 4;
#ifndef SPARAMX_GI
#define SPARAMX_GI 4
#endif
constexpr int kGroupsPerBlock = SPARAMX_GI;  // interleaved column groups
constexpr int64_t kPanelPairs = 256;  // K-pairs per decompressed panel (4 x 16 KiB)
constexpr int kPanelRows = 6;         // rows per register block in the panel kernel

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// acc (16 fp32 of column group g, row r) + bias -> y, clipped to n.
inline void store_acc(const LinearArgs& a, int64_t g, int64_t r, __m512 acc) {
  const int64_t col0 = g * kGroupCols;
  const int64_t cols = min64(kGroupCols, a.n - col0);
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  if (a.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, a.bias + col0));
  if (a.y_bf16) {
    auto* y = static_cast<uint16_t*>(a.y) + r * a.y_stride + col0;
    _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(acc));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(a.y) + r * a.y_stride + col0, mask, acc);
  }
}

inline const uint16_t* group_values(const LinearArgs& a, int64_t g) {
  return a.bitmap ? a.values + a.offsets[g] : a.values + g * a.k_pairs * kUnitVals;
}

// Streaming kernel: the GI column groups g[0..GI), MB rows from r0, all K. The loops
// over GI and MB are unrolled so the accumulators live in registers (a rolled loop keeps
// them on the stack, and store-forwarding latency then doubles the time per unit).
template <int GI, int MB, bool kSparse>
void decode_block(const LinearArgs& a, const int64_t* g, int64_t r0) {
  const int64_t P = a.k_pairs;
  __m512 acc[GI][MB];
  const uint16_t* v[GI];
  const uint32_t* bm[GI];
  const uint32_t* x[MB];  // x rows viewed as bf16 pairs
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_values(a, g[gi]);
    bm[gi] = kSparse ? a.bitmap + g[gi] * P : nullptr;
    _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) acc[gi][m] = _mm512_setzero_ps();
  }
  _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
    x[m] = reinterpret_cast<const uint32_t*>(a.x + (r0 + m) * a.x_stride);
  for (int64_t p = 0; p < P; ++p) {
    __m512i xb[MB];
    _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_epi32(static_cast<int>(x[m][p]));
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
      __m512i w;
      if constexpr (kSparse) {
        const uint32_t bits = bm[gi][p];
        w = sparamx_expand_unit(bits, _mm512_loadu_si512(v[gi]));
        v[gi] += _mm_popcnt_u32(bits);
      } else {
        w = _mm512_loadu_si512(v[gi]);
        v[gi] += kUnitVals;
      }
      _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
        acc[gi][m] = _mm512_dpbf16_ps(acc[gi][m], (__m512bh)w, (__m512bh)xb[m]);
    }
  }
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
    _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) store_acc(a, g[gi], r0 + m, acc[gi][m]);
}

template <int GI, bool kSparse>
void decode_rows(const LinearArgs& a, const int64_t* g) {
  switch (a.m) {
    case 1: return decode_block<GI, 1, kSparse>(a, g, 0);
    case 2: return decode_block<GI, 2, kSparse>(a, g, 0);
    case 3: return decode_block<GI, 3, kSparse>(a, g, 0);
    default: return decode_block<GI, 4, kSparse>(a, g, 0);
  }
}

// Groups [g_begin, g_end) in kGroupsPerBlock streams of `span` consecutive groups each;
// block b takes group b of every stream. The last stream may be shorter: its missing
// blocks run the other streams' groups one at a time.
template <bool kSparse>
void decode(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kGroupsPerBlock;
  for_stream_blocks<GI>(
      g_begin, g_end, [&](const int64_t* g) { decode_rows<GI, kSparse>(a, g); },
      [&](const int64_t* g) { decode_rows<1, kSparse>(a, g); });
}

// Decompress K-pairs [p0, p0 + np) of one group into a dense panel [np, 32].
// `v` is the group's value cursor, advanced past the consumed values.
template <bool kSparse>
inline void fill_panel(const LinearArgs& a, int64_t g, int64_t p0, int64_t np,
                       const uint16_t*& v, uint16_t* panel) {
  if constexpr (kSparse) {
    const uint32_t* bm = a.bitmap + g * a.k_pairs + p0;
    for (int64_t p = 0; p < np; ++p) {
      const uint32_t bits = bm[p];
      _mm512_store_si512(panel + p * kUnitVals,
                         sparamx_expand_unit(bits, _mm512_loadu_si512(v)));
      v += _mm_popcnt_u32(bits);
    }
  } else {
    std::memcpy(panel, v, np * kUnitVals * sizeof(uint16_t));
    v += np * kUnitVals;
  }
}

// Panel kernel: MB rows from r0 times kGroupsPerBlock groups, K-pairs [p0, p0 + np),
// accumulating into acc_buf[r][gi * 16 + c] (fp32 partial sums across panels).
// kScaled (int8 layouts, the panel is one scale block of bf16 q): the panel's sums
// start from zero and are multiplied by scale[gi][0..16) into acc_buf.
template <int MB, bool kScaled = false>
void panel_block(const LinearArgs& a, const uint16_t* panel, int64_t np, int64_t p0, int64_t r0,
                 float* acc_buf, bool first, const float* const* scale = nullptr) {
  constexpr int GI = kGroupsPerBlock;
  __m512 acc[GI][MB];
  _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
      acc[gi][m] = first || kScaled
                       ? _mm512_setzero_ps()
                       : _mm512_loadu_ps(acc_buf + (r0 + m) * GI * kGroupCols + gi * kGroupCols);
  const uint32_t* x[MB];
  _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
    x[m] = reinterpret_cast<const uint32_t*>(a.x + (r0 + m) * a.x_stride) + p0;
  for (int64_t p = 0; p < np; ++p) {
    __m512i w[GI];
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
      w[gi] = _mm512_load_si512(panel + (gi * kPanelPairs + p) * kUnitVals);
    _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(x[m][p]));
      _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
        acc[gi][m] = _mm512_dpbf16_ps(acc[gi][m], (__m512bh)w[gi], (__m512bh)xb);
    }
  }
  _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
      float* dst = acc_buf + (r0 + m) * GI * kGroupCols + gi * kGroupCols;
      __m512 out = acc[gi][m];
      if constexpr (kScaled) {
        const __m512 s = _mm512_loadu_ps(scale[gi]);
        out = first ? _mm512_mul_ps(out, s) : _mm512_fmadd_ps(out, s, _mm512_loadu_ps(dst));
      }
      _mm512_storeu_ps(dst, out);
    }
}

template <bool kScaled = false>
void panel_rows(const LinearArgs& a, const uint16_t* panel, int64_t np, int64_t p0, int64_t r0,
                int64_t rows, float* acc_buf, bool first, const float* const* scale = nullptr) {
  switch (rows) {
    case 1: return panel_block<1, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
    case 2: return panel_block<2, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
    case 3: return panel_block<3, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
    case 4: return panel_block<4, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
    case 5: return panel_block<5, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
    default: return panel_block<6, kScaled>(a, panel, np, p0, r0, acc_buf, first, scale);
  }
}

template <bool kSparse>
void prefill(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kGroupsPerBlock;
  alignas(64) static thread_local uint16_t panel[GI * kPanelPairs * kUnitVals];
  // fp32 partial sums [M, GI * 16] carried across K-chunks.
  float* acc_buf = static_cast<float*>(std::malloc(sizeof(float) * a.m * GI * kGroupCols));
  if (!acc_buf) std::abort();  // out of memory: no exceptions across this boundary
  const int64_t P = a.k_pairs;
  for (int64_t g0 = g_begin; g0 < g_end; g0 += GI) {
    const int64_t ng = min64(GI, g_end - g0);
    const uint16_t* v[GI];
    for (int gi = 0; gi < ng; ++gi) v[gi] = group_values(a, g0 + gi);
    for (int64_t p0 = 0; p0 < P; p0 += kPanelPairs) {
      const int64_t np = min64(kPanelPairs, P - p0);
      _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
        uint16_t* dst = panel + gi * kPanelPairs * kUnitVals;
        if (gi < ng)
          fill_panel<kSparse>(a, g0 + gi, p0, np, v[gi], dst);
        else  // missing groups at the end of the range compute on zeros
          std::memset(dst, 0, np * kUnitVals * sizeof(uint16_t));
      }
      for (int64_t r0 = 0; r0 < a.m; r0 += kPanelRows)
        panel_rows(a, panel, np, p0, r0, min64(kPanelRows, a.m - r0),
                   acc_buf, p0 == 0);
    }
    for (int64_t r = 0; r < a.m; ++r)
      for (int gi = 0; gi < ng; ++gi)
        store_acc(a, g0 + gi, r, _mm512_loadu_ps(acc_buf + r * GI * kGroupCols +
                                                 gi * kGroupCols));
  }
  std::free(acc_buf);
}

// ---- Int8 layouts (bitmap-int8, dense-int8) ----
//
// A unit's 32 int8 are expanded with its bitmap (vpexpandb, dependency-free as in
// expand_avx512.h), widened to fp32 and narrowed to bf16, which is exact for |q| <= 127,
// so the bf16 units' vdpbf16ps loop applies unchanged: q * x products are exact and
// summed in fp32 per scale block (64 K-pairs); at the end of each block the 16 sums of
// a column group and row are multiplied by the block's row scales into the total. The
// alternative, fp32 FMAs on pairs of fp32 weights, costs the same conversion plus two
// FMAs per row instead of one vdpbf16ps, and a final fold of the pair lanes.

static inline __m256i expand_unit_i8(uint32_t bits, __m256i kept) {
  __m256i zero = _mm256_setzero_si256();
  asm("" : "+v"(zero));
  return _mm256_mask_expand_epi8(zero, bits, kept);
}

// 32 int8 -> 32 bf16 (in order), exact.
inline __m512i unit_i8_to_bf16(__m256i q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

inline const int8_t* group_qvalues(const LinearArgs& a, int64_t g) {
  return a.bitmap ? a.qvalues + a.offsets[g] : a.qvalues + g * a.k_pairs * kUnitVals;
}

inline __m256i load_unit_i8(const LinearArgs& a, bool sparse, const uint32_t* bm, int64_t p,
                            const int8_t*& v) {
  if (sparse) {
    const uint32_t bits = bm[p];
    const __m256i q = expand_unit_i8(bits, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
    v += _mm_popcnt_u32(bits);
    return q;
  }
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  v += kUnitVals;
  return q;
}

// Streaming int8 kernel for 2-4 rows: GI column groups, MB rows from r0, all K (see
// decode_block); the bf16 conversion is shared by the rows' vdpbf16ps.
template <int GI, int MB, bool kSparse>
void decode_block_i8(const LinearArgs& a, const int64_t* g, int64_t r0) {
  const int64_t P = a.k_pairs;
  __m512 acc[GI][MB];
  __m512 tot[GI][MB];
  const int8_t* v[GI];
  const uint32_t* bm[GI];
  const float* sc[GI];
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_qvalues(a, g[gi]);
    bm[gi] = kSparse ? a.bitmap + g[gi] * P : nullptr;
    sc[gi] = a.scales + g[gi] * a.k_blocks * kGroupCols;
  }
  const uint32_t* x[MB];
  _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
    x[m] = reinterpret_cast<const uint32_t*>(a.x + (r0 + m) * a.x_stride);
  for (int64_t p0 = 0; p0 < P; p0 += kQBlockPairs) {
    const int64_t p1 = min64(P, p0 + kQBlockPairs);
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
      _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) acc[gi][m] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      __m512i xb[MB];
      _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
        xb[m] = _mm512_set1_epi32(static_cast<int>(x[m][p]));
      _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
        const __m512i w = unit_i8_to_bf16(load_unit_i8(a, kSparse, bm[gi], p, v[gi]));
        _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
          acc[gi][m] = _mm512_dpbf16_ps(acc[gi][m], (__m512bh)w, (__m512bh)xb[m]);
      }
    }
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
      const __m512 s = _mm512_loadu_ps(sc[gi] + (p0 / kQBlockPairs) * kGroupCols);
      _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m)
        tot[gi][m] = p0 == 0 ? _mm512_mul_ps(acc[gi][m], s)
                             : _mm512_fmadd_ps(acc[gi][m], s, tot[gi][m]);
    }
  }
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi)
    _Pragma("GCC unroll 16") for (int m = 0; m < MB; ++m) store_acc(a, g[gi], r0 + m, tot[gi][m]);
}

// M = 1: two units (K-pairs p, p+1, adjacent in values) per 64-byte load and one
// vpexpandb of their joint 64-bit mask; each unit's bytes then go straight to the top
// byte of 32 fp32 lanes (a zero-masking vpermb per 16 values), are converted (q * 2^24,
// exact) and FMA'd with x's pair as fp32 (lane 2c+j: W[16g+c][2p+j] * x[2p+j]). Per
// block the pair lanes are folded and scaled by scale * 2^-24. Measured against the
// bf16 route of decode_block_i8 (one unit per expand, q -> fp32 -> bf16, vdpbf16ps) on
// an AMX Xeon, 4096x4096 50% cache-resident, 1 thread: 1411 us that way, 768 us with
// one unit per expand and this arithmetic, 645 us with two (bitmap-bf16: 707 us).
// Software prefetch distance (bytes) on each int8 value stream at M = 1: with the
// weights in DRAM (AMX Xeon, 1 thread, 50%) 14336x4096 took 3423 us without it and
// 2842 us with it (bitmap-bf16: 4999 us); the decode loop's compute leaves the hardware
// prefetcher behind.
constexpr int kPrefetchI8 = 1024;

template <int GI, bool kSparse>
void decode_m1_i8(const LinearArgs& a, const int64_t* g) {
  const int64_t P = a.k_pairs;  // a multiple of 16, so pairs of units never straddle a block
  alignas(64) static const uint8_t kIdx[4][64] = {
#define SPARAMX_Q(i, o) 0, 0, 0, (i) + (o)
#define SPARAMX_Q4(i, o) SPARAMX_Q(i, o), SPARAMX_Q(i + 1, o), SPARAMX_Q(i + 2, o), SPARAMX_Q(i + 3, o)
#define SPARAMX_Q16(o) SPARAMX_Q4(0, o), SPARAMX_Q4(4, o), SPARAMX_Q4(8, o), SPARAMX_Q4(12, o)
      {SPARAMX_Q16(0)}, {SPARAMX_Q16(16)}, {SPARAMX_Q16(32)}, {SPARAMX_Q16(48)},
#undef SPARAMX_Q16
#undef SPARAMX_Q4
#undef SPARAMX_Q
  };
  __m512i idx[4];
  _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) idx[i] = _mm512_load_si512(kIdx[i]);
  const __mmask64 top = 0x8888888888888888ull;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 unscale = _mm512_set1_ps(0x1p-24f);
  __m512 acc[GI][2];
  __m512 tot[GI];
  const int8_t* v[GI];
  const uint64_t* bm[GI];  // bitmap words of units p, p+1 as one 64-bit mask
  const float* sc[GI];
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_qvalues(a, g[gi]);
    bm[gi] = kSparse ? reinterpret_cast<const uint64_t*>(a.bitmap + g[gi] * P) : nullptr;
    sc[gi] = a.scales + g[gi] * a.k_blocks * kGroupCols;
  }
  const uint32_t* x = reinterpret_cast<const uint32_t*>(a.x);
  for (int64_t p0 = 0; p0 < P; p0 += kQBlockPairs) {
    const int64_t p1 = min64(P, p0 + kQBlockPairs);
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) acc[gi][0] = acc[gi][1] =
        _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; p += 2) {
      __m512 xf[2];
      _Pragma("GCC unroll 2") for (int u = 0; u < 2; ++u) {
        const uint32_t xp = x[p + u];
        const uint64_t pair = (static_cast<uint64_t>(xp & 0xffff0000u) << 32) | (xp << 16);
        xf[u] = _mm512_castsi512_ps(_mm512_set1_epi64(static_cast<long long>(pair)));
      }
      _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
        __m512i q;
        _mm_prefetch(reinterpret_cast<const char*>(v[gi]) + kPrefetchI8, _MM_HINT_T0);
        if constexpr (kSparse) {
          const uint64_t bits = bm[gi][p / 2];
          __m512i zero = _mm512_setzero_si512();
          asm("" : "+v"(zero));  // dependency-free expand, as in expand_avx512.h
          q = _mm512_mask_expand_epi8(zero, bits, _mm512_loadu_si512(v[gi]));
          v[gi] += _mm_popcnt_u64(bits);
        } else {
          q = _mm512_loadu_si512(v[gi]);
          v[gi] += 2 * kUnitVals;
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; ++i) {
          const __m512 w = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(top, idx[i], q));
          acc[gi][i & 1] = _mm512_fmadd_ps(w, xf[i >> 1], acc[gi][i & 1]);
        }
      }
    }
    _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
      const __m512 sum = _mm512_add_ps(_mm512_permutex2var_ps(acc[gi][0], even, acc[gi][1]),
                                       _mm512_permutex2var_ps(acc[gi][0], odd, acc[gi][1]));
      const __m512 s = _mm512_mul_ps(
          _mm512_loadu_ps(sc[gi] + (p0 / kQBlockPairs) * kGroupCols), unscale);
      tot[gi] = p0 == 0 ? _mm512_mul_ps(sum, s) : _mm512_fmadd_ps(sum, s, tot[gi]);
    }
  }
  _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) store_acc(a, g[gi], 0, tot[gi]);
}

template <int GI, bool kSparse>
void decode_rows_i8(const LinearArgs& a, const int64_t* g) {
  switch (a.m) {
    case 1: return decode_m1_i8<GI, kSparse>(a, g);
    case 2: return decode_block_i8<GI, 2, kSparse>(a, g, 0);
    case 3: return decode_block_i8<GI, 3, kSparse>(a, g, 0);
    default: return decode_block_i8<GI, 4, kSparse>(a, g, 0);
  }
}

// The same streams over the thread's groups as decode().
template <bool kSparse>
void decode_i8(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kGroupsPerBlock;
  for_stream_blocks<GI>(
      g_begin, g_end, [&](const int64_t* g) { decode_rows_i8<GI, kSparse>(a, g); },
      [&](const int64_t* g) { decode_rows_i8<1, kSparse>(a, g); });
}

// Prefill: each group's scale block (64 K-pairs) is decompressed to bf16 q once into
// the panel and reused by every block of rows; panel_block<.., kScaled> applies the
// block's scales as it adds the panel's sums into acc_buf.
template <bool kSparse>
void prefill_i8(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kGroupsPerBlock;
  alignas(64) static thread_local uint16_t panel[GI * kPanelPairs * kUnitVals];
  alignas(64) static const float zero_scales[kGroupCols] = {};
  float* acc_buf = static_cast<float*>(std::malloc(sizeof(float) * a.m * GI * kGroupCols));
  if (!acc_buf) std::abort();  // out of memory: no exceptions across this boundary
  const int64_t P = a.k_pairs;
  for (int64_t g0 = g_begin; g0 < g_end; g0 += GI) {
    const int64_t ng = min64(GI, g_end - g0);
    const int8_t* v[GI];
    const uint32_t* bm[GI];
    for (int gi = 0; gi < ng; ++gi) {
      v[gi] = group_qvalues(a, g0 + gi);
      bm[gi] = kSparse ? a.bitmap + (g0 + gi) * P : nullptr;
    }
    for (int64_t p0 = 0; p0 < P; p0 += kQBlockPairs) {
      const int64_t np = min64(kQBlockPairs, P - p0);
      const float* scale[GI];
      _Pragma("GCC unroll 16") for (int gi = 0; gi < GI; ++gi) {
        uint16_t* dst = panel + gi * kPanelPairs * kUnitVals;
        if (gi < ng) {
          for (int64_t p = 0; p < np; ++p)
            _mm512_store_si512(dst + p * kUnitVals,
                               unit_i8_to_bf16(load_unit_i8(a, kSparse, bm[gi], p0 + p, v[gi])));
          scale[gi] = a.scales + ((g0 + gi) * a.k_blocks + p0 / kQBlockPairs) * kGroupCols;
        } else {  // missing groups at the end of the range compute on zeros
          std::memset(dst, 0, np * kUnitVals * sizeof(uint16_t));
          scale[gi] = zero_scales;
        }
      }
      for (int64_t r0 = 0; r0 < a.m; r0 += kPanelRows)
        panel_rows<true>(a, panel, np, p0, r0, min64(kPanelRows, a.m - r0), acc_buf, p0 == 0,
                         scale);
    }
    for (int64_t r = 0; r < a.m; ++r)
      for (int gi = 0; gi < ng; ++gi)
        store_acc(a, g0 + gi, r, _mm512_loadu_ps(acc_buf + r * GI * kGroupCols +
                                                 gi * kGroupCols));
  }
  std::free(acc_buf);
}

}  // namespace

void linear_avx512(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const bool sparse = a.bitmap != nullptr;
  if (a.m <= kDecodeMaxRows) {
    sparse ? decode<true>(a, g_begin, g_end) : decode<false>(a, g_begin, g_end);
  } else {
    sparse ? prefill<true>(a, g_begin, g_end) : prefill<false>(a, g_begin, g_end);
  }
}

void linear_int8_avx512(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const bool sparse = a.bitmap != nullptr;
  if (a.m <= kDecodeMaxRows) {
    sparse ? decode_i8<true>(a, g_begin, g_end) : decode_i8<false>(a, g_begin, g_end);
  } else {
    sparse ? prefill_i8<true>(a, g_begin, g_end) : prefill_i8<false>(a, g_begin, g_end);
  }
}

}  // namespace sparamx

#pragma GCC pop_options
