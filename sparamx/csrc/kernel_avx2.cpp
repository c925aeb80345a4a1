// AVX2+FMA kernel (Zen 2/3, Haswell and later: most client and cloud x86 CPUs), for
// CPUs without a bf16 dot product. The packed bytes are the same as for every other
// kernel; only the arithmetic differs: bf16 -> fp32 is a 16-bit shift, products are
// fp32 FMAs.
//
// Expanding a unit without vpexpandw: each bitmap byte covers 8 of the unit's 32
// values (4 output columns x the K-pair). The byte indexes kExpand, a 256-entry table
// of vpshufb masks, applied to the 16 bytes at that byte's first kept value broadcast
// to both 128-bit lanes; lane 0 receives the 4 columns' first K of the pair and lane 1
// their second, each bf16 placed in the high half of a 32-bit lane, which makes it
// the fp32 value. So one shuffle per 8 values gives FMA-ready floats, and the offsets
// of the four bytes are popcounts of the unit's bitmap word (no chain through the
// bytes; only the unit-to-unit pointer advance is serial, and several column groups
// run interleaved). At M = 1 each unit is one short assembly block (unit_m1: 28
// instructions against ~38 from the intrinsics, measured 1-9% faster on Zen 3, where
// the loop is bound by issue, not by a dependency chain).
//
// Decode (M <= kDecodeMaxRows) streams the compressed bytes once per pass of up to 3
// rows, as the AVX-512 kernel does. Larger M decompresses each group's K-chunk into an
// fp32 panel [k][16 columns] in cache and runs a 6-row x 16-column register-blocked
// FMA kernel over it (torch's own bf16 matmul has no fast path on these CPUs, so fp32
// FMAs are the fast way). Measured there: 4 rows take 5.5 ns per unit streamed in two
// passes against 6.4 through a panel, 8 rows 9.2 against 10.3; from 9 rows on the
// panel wins.
//
// Headers come before the target pragma, and no std:: template is instantiated after
// it (see kernel_avx512.cpp for why).
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace sparamx {
namespace {

constexpr int popcount8(int m) {
  int c = 0;
  for (int i = 0; i < 8; ++i) c += (m >> i) & 1;
  return c;
}

// kExpand.e[m].idx: the vpshufb mask for bitmap byte m (bit e = 2c + j: column c of
// the byte's four, K-pair element j). Destination lane j, 32-bit slot c, gets source
// bf16 number popcount(m below bit e) in its high 16 bits, or zero if bit e is clear
// (mask bytes with the top bit set write zero).
struct ExpandEntry {
  uint8_t idx[32];
};
struct ExpandTable {
  alignas(64) ExpandEntry e[256];
  constexpr ExpandTable() : e{} {
    for (int m = 0; m < 256; ++m) {
      for (int j = 0; j < 2; ++j)
        for (int c = 0; c < 4; ++c) {
          const int b = 2 * c + j;
          uint8_t* d = e[m].idx + 16 * j + 4 * c;
          d[0] = d[1] = 0x80;
          d[2] = d[3] = 0x80;
          if ((m >> b) & 1) {
            const int r = popcount8(m & ((1 << b) - 1));
            d[2] = static_cast<uint8_t>(2 * r);
            d[3] = static_cast<uint8_t>(2 * r + 1);
          }
        }
    }
  }
};
static_assert(sizeof(ExpandEntry) == 32, "two table entries per cache line");
constexpr ExpandTable kExpand{};

// kExpandI8.e[m].idx: the same placement for int8 values: the source byte goes to the
// top byte of its 32-bit slot, so an arithmetic shift right by 24 gives the int32 q.
struct ExpandTableI8 {
  alignas(64) ExpandEntry e[256];
  constexpr ExpandTableI8() : e{} {
    for (int m = 0; m < 256; ++m) {
      for (int j = 0; j < 2; ++j)
        for (int c = 0; c < 4; ++c) {
          const int b = 2 * c + j;
          uint8_t* d = e[m].idx + 16 * j + 4 * c;
          d[0] = d[1] = d[2] = d[3] = 0x80;
          if ((m >> b) & 1) d[3] = static_cast<uint8_t>(popcount8(m & ((1 << b) - 1)));
        }
    }
  }
};
constexpr ExpandTableI8 kExpandI8{};

}  // namespace
}  // namespace sparamx

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "decode_streams.h"

namespace sparamx {
namespace {

constexpr int64_t kDecodeMaxRows = 8;  // streaming in row passes up to here, panels above
// Software prefetch distance on each value stream at M = 1: with the weights in DRAM it
// measured ~5% faster than none (14336x4096, 50%, Zen 3), the hardware prefetcher alone
// lagging behind a compute-heavy loop.
constexpr int kPrefetchBytes = 768;
constexpr int kPanelPairs = 128;  // K-pairs per decompressed panel: 256 k x 16 fp32 = 16 KiB
constexpr int kPanelGroups = 4;   // panels (column groups) sharing one pass over x
constexpr int kPanelRows = 6;     // rows per register block: 6 x 2 accumulators

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline const uint16_t* group_values(const LinearArgs& a, int64_t g) {
  return a.bitmap ? a.values + a.offsets[g] : a.values + g * a.k_pairs * kUnitVals;
}

// Byte b of a unit as fp32: lane 0 = W[4b + c, 2p], lane 1 = W[4b + c, 2p + 1], c < 4.
// `v` points at the byte's first kept value; 16 bytes are read from there (the values
// buffer ends in kValuesPad zeros, so this stays inside it).
inline __m256 expand_byte(const uint16_t* v, uint64_t byte) {
  const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.e[byte].idx));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, idx));
}

// One unit at M = 1: acc[b] += expand(byte b) * x, and u advances past the unit's
// values. In assembly because the compiler's version of the same steps spends ~38
// instructions per unit (popcnt false-dependency breakers, copies, spilled stream
// pointers); this spends 28: per byte a load, a popcnt, a shift to the table entry, the
// broadcast, the shuffle and the FMA, plus the running offsets. No pdep/pext (they are
// microcoded on Zen 1/2).
inline void unit_m1(const uint16_t*& u, const uint8_t* bytes, __m256 x, __m256& a0, __m256& a1,
                    __m256& a2, __m256& a3) {
  uint64_t r0, r1, r2, r3, c1, c2, c3;
  __m256 t;
  asm("movzbl   (%[bm]), %k[r0]\n\t"
      "movzbl  1(%[bm]), %k[r1]\n\t"
      "movzbl  2(%[bm]), %k[r2]\n\t"
      "movzbl  3(%[bm]), %k[r3]\n\t"
      "popcnt %[r0], %[c1]\n\t"
      "popcnt %[r1], %[c2]\n\t"
      "popcnt %[r2], %[c3]\n\t"
      "add %[c1], %[c2]\n\t"
      "add %[c2], %[c3]\n\t"
      "shl $5, %[r0]\n\t"
      "shl $5, %[r1]\n\t"
      "shl $5, %[r2]\n\t"
      "vbroadcasti128 (%[u]), %[t]\n\t"
      "vpshufb (%[tab],%[r0]), %[t], %[t]\n\t"
      "vfmadd231ps %[t], %[x], %[a0]\n\t"
      "vbroadcasti128 (%[u],%[c1],2), %[t]\n\t"
      "vpshufb (%[tab],%[r1]), %[t], %[t]\n\t"
      "vfmadd231ps %[t], %[x], %[a1]\n\t"
      "vbroadcasti128 (%[u],%[c2],2), %[t]\n\t"
      "vpshufb (%[tab],%[r2]), %[t], %[t]\n\t"
      "vfmadd231ps %[t], %[x], %[a2]\n\t"
      "popcnt %[r3], %[r0]\n\t"
      "vbroadcasti128 (%[u],%[c3],2), %[t]\n\t"
      "shl $5, %[r3]\n\t"
      "add %[r0], %[c3]\n\t"
      "vpshufb (%[tab],%[r3]), %[t], %[t]\n\t"
      "vfmadd231ps %[t], %[x], %[a3]\n\t"
      "lea (%[u],%[c3],2), %[u]"
      : [u] "+r"(u), [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3),
        [r0] "=&r"(r0), [r1] "=&r"(r1), [r2] "=&r"(r2), [r3] "=&r"(r3), [c1] "=&r"(c1),
        [c2] "=&r"(c2), [c3] "=&r"(c3), [t] "=&x"(t)
      : [bm] "r"(bytes), [tab] "r"(kExpand.e), [x] "x"(x)
      : "cc");
}

// Dense unit half h (columns 8h .. 8h+7) as fp32: j = 0 and j = 1 of the K-pair.
inline __m256 dense_lo(__m256i u) { return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)); }
inline __m256 dense_hi(__m256i u) {
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// x row r as per-pair broadcasts: xv[p * 8 .. +8] = [x0 x0 x0 x0 x1 x1 x1 x1] of pair p,
// the multiplier layout of expand_byte's output. Grown per thread, never shrunk.
float* pair_broadcasts(const LinearArgs& a, int64_t rows) {
  static thread_local float* buf = nullptr;
  static thread_local int64_t cap = 0;
  const int64_t need = rows * a.k_pairs * 8;
  if (need > cap) {
    std::free(buf);
    buf = static_cast<float*>(std::aligned_alloc(32, ((need * 4 + 31) / 32) * 32));
    if (!buf) std::abort();  // out of memory: no exceptions across this boundary
    cap = need;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = a.x + r * a.x_stride;
    float* out = buf + r * a.k_pairs * 8;
    for (int64_t p = 0; p < a.k_pairs; ++p) {
      const float x0 = bf16_to_float(x[2 * p]), x1 = bf16_to_float(x[2 * p + 1]);
      const __m256 v = _mm256_setr_ps(x0, x0, x0, x0, x1, x1, x1, x1);
      _mm256_store_ps(out + p * 8, v);
    }
  }
  return buf;
}

// Sum of lane 0 and lane 1 of each byte's accumulator: the group's 16 column results.
inline void fold_bytes(const __m256* acc, float* out) {
  for (int b = 0; b < 4; ++b) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));
    _mm_storeu_ps(out + 4 * b, s);
  }
}

// Streaming sparse decode: GI column groups g[0..GI), MB rows, all K. acc[gi][m][b] holds
// byte b's four columns (two lanes per column, folded at the end). The loops over GI,
// MB and b are unrolled so the accumulators stay in registers.
template <int GI, int MB>
void decode_sparse(const LinearArgs& a, const int64_t* g, const float* xv, int64_t r0) {
  const int64_t P = a.k_pairs;
  __m256 acc[GI][MB][4];
  const uint16_t* v[GI];
  const uint32_t* bm[GI];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_values(a, g[gi]);
    bm[gi] = a.bitmap + g[gi] * P;
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
      _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) acc[gi][m][b] = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < P; ++p) {
    __m256 x[MB];
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
      x[m] = _mm256_load_ps(xv + ((r0 + m) * P + p) * 8);
    _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(bm[gi] + p);
      _mm_prefetch(reinterpret_cast<const char*>(v[gi]) + kPrefetchBytes, _MM_HINT_T0);
      if constexpr (MB == 1) {
        unit_m1(v[gi], bytes, x[0], acc[gi][0][0], acc[gi][0][1], acc[gi][0][2], acc[gi][0][3]);
        continue;
      }
      const uint16_t* u = v[gi];
      const uint64_t by[4] = {bytes[0], bytes[1], bytes[2], bytes[3]};
      uint64_t o[4];
      o[0] = 0;
      o[1] = _mm_popcnt_u64(by[0]);
      o[2] = o[1] + _mm_popcnt_u64(by[1]);
      o[3] = o[2] + _mm_popcnt_u64(by[2]);
      v[gi] += o[3] + _mm_popcnt_u64(by[3]);
      _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
        const __m256 w = expand_byte(u + o[b], by[b]);
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
          acc[gi][m][b] = _mm256_fmadd_ps(w, x[m], acc[gi][m][b]);
      }
    }
  }
  alignas(32) float out[kGroupCols];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi)
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      fold_bytes(acc[gi][m], out);
      store_group_row(a, g[gi], r0 + m, out);
    }
}

// Streaming dense-layout decode: acc[gi][m][h] = columns 8h .. 8h+7 in order.
template <int GI, int MB>
void decode_dense(const LinearArgs& a, const int64_t* g, const float* xv, int64_t r0) {
  const int64_t P = a.k_pairs;
  __m256 acc[GI][MB][2];
  const uint16_t* v[GI];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_values(a, g[gi]);
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      acc[gi][m][0] = _mm256_setzero_ps();
      acc[gi][m][1] = _mm256_setzero_ps();
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    __m256 x0[MB], x1[MB];
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      x0[m] = _mm256_broadcast_ss(xv + ((r0 + m) * P + p) * 8);
      x1[m] = _mm256_broadcast_ss(xv + ((r0 + m) * P + p) * 8 + 4);
    }
    _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v[gi] + p * kUnitVals));
      const __m256i hi =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v[gi] + p * kUnitVals + 16));
      const __m256 l0 = dense_lo(lo), l1 = dense_hi(lo), h0 = dense_lo(hi), h1 = dense_hi(hi);
      _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
        acc[gi][m][0] = _mm256_fmadd_ps(l0, x0[m], acc[gi][m][0]);
        acc[gi][m][1] = _mm256_fmadd_ps(h0, x0[m], acc[gi][m][1]);
        acc[gi][m][0] = _mm256_fmadd_ps(l1, x1[m], acc[gi][m][0]);
        acc[gi][m][1] = _mm256_fmadd_ps(h1, x1[m], acc[gi][m][1]);
      }
    }
  }
  alignas(32) float out[kGroupCols];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi)
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      _mm256_store_ps(out, acc[gi][m][0]);
      _mm256_store_ps(out + 8, acc[gi][m][1]);
      store_group_row(a, g[gi], r0 + m, out);
    }
}

// Interleaved streams (column groups) per pass of MB rows. Sparse: 4 accumulators per
// group and row, so 3 groups at M = 1 (12 of the 16 ymm registers) and one group for
// 2-3 rows; dense: 2 per group and row, so 4 groups at M = 1 and 2 for 2-3 rows.
template <bool kSparse, int MB>
struct Streams {
  static constexpr int value = kSparse ? (MB == 1 ? 3 : 1) : (MB == 1 ? 4 : 2);
};

template <bool kSparse, int GI, int MB>
inline void decode_groups(const LinearArgs& a, const int64_t* g, const float* xv, int64_t r0) {
  if constexpr (kSparse)
    decode_sparse<GI, MB>(a, g, xv, r0);
  else
    decode_dense<GI, MB>(a, g, xv, r0);
}

// All rows of x for the groups g[0..GI), in the passes of for_row_passes.
template <bool kSparse, int GI>
void decode_rows(const LinearArgs& a, const int64_t* g, const float* xv) {
  for_row_passes(a.m, [&](auto rows, int64_t r0) {
    decode_groups<kSparse, GI, decltype(rows)::value>(a, g, xv, r0);
  });
}

// Groups [g_begin, g_end) in GI streams of `span` consecutive groups each (block b takes
// group b of every stream), so each stream walks one contiguous run of values and
// bitmap words; the last stream may be shorter, and its missing blocks run the other
// streams' groups one at a time. (Same scheme as the AVX-512 decode.)
template <bool kSparse, int GI>
void decode_streams(const LinearArgs& a, int64_t g_begin, int64_t g_end, const float* xv) {
  for_stream_blocks<GI>(
      g_begin, g_end, [&](const int64_t* g) { decode_rows<kSparse, GI>(a, g, xv); },
      [&](const int64_t* g) { decode_rows<kSparse, 1>(a, g, xv); });
}

template <bool kSparse>
void decode(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const float* xv = pair_broadcasts(a, a.m);
  if (a.m == 1) return decode_streams<kSparse, Streams<kSparse, 1>::value>(a, g_begin, g_end, xv);
  decode_streams<kSparse, Streams<kSparse, 2>::value>(a, g_begin, g_end, xv);
}

// Decompress K-pairs [p0, p0 + np) of group g into panel[2 np][16] fp32 (row k = input
// column 2 (p0 + i) + j, columns in order). `v` is the group's value cursor.
template <bool kSparse>
inline void fill_panel(const LinearArgs& a, int64_t g, int64_t p0, int64_t np,
                       const uint16_t*& v, float* panel) {
  if constexpr (kSparse) {
    const uint32_t* bm = a.bitmap + g * a.k_pairs + p0;
    for (int64_t i = 0; i < np; ++i) {
      const uint32_t bits = bm[i];
      const int o[4] = {0, _mm_popcnt_u32(bits & 0xffu), _mm_popcnt_u32(bits & 0xffffu),
                        _mm_popcnt_u32(bits & 0xffffffu)};
      float* row0 = panel + (2 * i) * kGroupCols;
      float* row1 = row0 + kGroupCols;
      _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
        const __m256 w = expand_byte(v + o[b], (bits >> (8 * b)) & 0xffu);
        _mm_store_ps(row0 + 4 * b, _mm256_castps256_ps128(w));
        _mm_store_ps(row1 + 4 * b, _mm256_extractf128_ps(w, 1));
      }
      v += _mm_popcnt_u32(bits);
    }
  } else {
    for (int64_t i = 0; i < np; ++i) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16));
      float* row0 = panel + (2 * i) * kGroupCols;
      _mm256_store_ps(row0, dense_lo(lo));
      _mm256_store_ps(row0 + 8, dense_lo(hi));
      _mm256_store_ps(row0 + kGroupCols, dense_hi(lo));
      _mm256_store_ps(row0 + kGroupCols + 8, dense_hi(hi));
      v += kUnitVals;
    }
  }
}

// MB rows from r0 of x (fp32, row stride xs) times one panel's 16 columns over nk
// inputs starting at k0; partial sums in c[r * cs .. + 16], started from zero when
// `first`.
template <int MB>
void panel_block(const float* panel, int64_t nk, const float* xf, int64_t xs, int64_t k0,
                 int64_t r0, float* c, int64_t cs, bool first) {
  __m256 acc[MB][2];
  _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
    acc[m][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + (r0 + m) * cs);
    acc[m][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + (r0 + m) * cs + 8);
  }
  const float* x = xf + r0 * xs + k0;
  for (int64_t k = 0; k < nk; ++k) {
    const __m256 w0 = _mm256_load_ps(panel + k * kGroupCols);
    const __m256 w1 = _mm256_load_ps(panel + k * kGroupCols + 8);
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * xs + k);
      acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(c + (r0 + m) * cs, acc[m][0]);
    _mm256_storeu_ps(c + (r0 + m) * cs + 8, acc[m][1]);
  }
}

void panel_rows(int rows, const float* panel, int64_t nk, const float* xf, int64_t xs, int64_t k0,
                int64_t r0, float* c, int64_t cs, bool first) {
  switch (rows) {
    case 1: return panel_block<1>(panel, nk, xf, xs, k0, r0, c, cs, first);
    case 2: return panel_block<2>(panel, nk, xf, xs, k0, r0, c, cs, first);
    case 3: return panel_block<3>(panel, nk, xf, xs, k0, r0, c, cs, first);
    case 4: return panel_block<4>(panel, nk, xf, xs, k0, r0, c, cs, first);
    case 5: return panel_block<5>(panel, nk, xf, xs, k0, r0, c, cs, first);
    default: return panel_block<6>(panel, nk, xf, xs, k0, r0, c, cs, first);
  }
}

// x as fp32 rows [M, Kp] (exact: bf16 widens losslessly), for the panel kernel's
// broadcasts.
float* x_as_float(const LinearArgs& a) {
  const int64_t kp = 2 * a.k_pairs;
  auto* xf = static_cast<float*>(std::aligned_alloc(32, ((a.m * kp * 4 + 31) / 32) * 32));
  if (!xf) std::abort();
  for (int64_t r = 0; r < a.m; ++r) {
    const uint16_t* x = a.x + r * a.x_stride;
    float* out = xf + r * kp;
    for (int64_t k = 0; k < kp; k += 8) {  // kp is a multiple of 32
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k));
      const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(out + k, _mm256_castsi256_ps(w));
    }
  }
  return xf;
}

template <bool kSparse>
void prefill(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kPanelGroups;
  constexpr int64_t cs = GI * kGroupCols;  // columns of the partial-sum buffer
  alignas(32) static thread_local float panel[GI][2 * kPanelPairs * kGroupCols];
  const int64_t P = a.k_pairs, xs = 2 * P;
  float* xf = x_as_float(a);
  auto* c = static_cast<float*>(std::aligned_alloc(32, ((a.m * cs * 4 + 31) / 32) * 32));
  if (!c) std::abort();
  for (int64_t g0 = g_begin; g0 < g_end; g0 += GI) {
    const int ng = static_cast<int>(min64(GI, g_end - g0));
    const uint16_t* v[GI];
    for (int gi = 0; gi < ng; ++gi) v[gi] = group_values(a, g0 + gi);
    for (int64_t p0 = 0; p0 < P; p0 += kPanelPairs) {
      const int64_t np = min64(kPanelPairs, P - p0);
      for (int gi = 0; gi < ng; ++gi) fill_panel<kSparse>(a, g0 + gi, p0, np, v[gi], panel[gi]);
      // Row blocks outside, groups inside: the block's x rows stay in L1 for all panels.
      for (int64_t r0 = 0; r0 < a.m; r0 += kPanelRows) {
        const int rows = static_cast<int>(min64(kPanelRows, a.m - r0));
        for (int gi = 0; gi < ng; ++gi)
          panel_rows(rows, panel[gi], 2 * np, xf, xs, 2 * p0, r0, c + gi * kGroupCols, cs,
                     p0 == 0);
      }
    }
    for (int64_t r = 0; r < a.m; ++r)
      for (int gi = 0; gi < ng; ++gi) store_group_row(a, g0 + gi, r, c + r * cs + gi * kGroupCols);
  }
  std::free(c);
  std::free(xf);
}

// ---- Int8 layouts (bitmap-int8, dense-int8) ----
//
// The bf16 scheme with int8 values: per bitmap byte, the (at most 8) values at its first
// kept one are broadcast with one 8-byte load, placed by a kExpandI8 shuffle, shifted to
// int32 and converted to fp32 (exact), then FMA'd with x. The dense layout runs the same
// code with every bit set (its unit's byte b starts at value 8b). Decode sums q * x per
// scale block (64 K-pairs) and then multiplies by the block's scales into the total;
// prefill stores the dequantized q * scale in the fp32 panel, so the bf16 panel kernel
// runs unchanged.

inline const int8_t* group_qvalues(const LinearArgs& a, int64_t g) {
  return a.bitmap ? a.qvalues + a.offsets[g] : a.qvalues + g * a.k_pairs * kUnitVals;
}

// Byte `byte` of a unit as fp32 q (lanes as expand_byte); reads 8 bytes from v.
inline __m256 expand_byte_i8(const int8_t* v, uint64_t byte) {
  const __m256i src = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)));
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandI8.e[byte].idx));
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_shuffle_epi8(src, idx), 24));
}

// The unit's four bytes and their value offsets; advances v past the unit.
template <bool kSparse>
inline void unit_bytes_i8(const uint32_t* bm, int64_t p, const int8_t*& v, uint64_t* by,
                          const int8_t** u) {
  if constexpr (kSparse) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(bm + p);
    uint64_t o = 0;
    _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
      by[b] = bytes[b];
      u[b] = v + o;
      o += _mm_popcnt_u64(by[b]);
    }
    v += o;
  } else {
    _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
      by[b] = 0xff;
      u[b] = v + 8 * b;
    }
    v += kUnitVals;
  }
}

// Streaming int8 decode: GI column groups g[0..GI), MB rows from r0, all K. acc holds the
// current block's sums (registers), tot the scaled totals (touched once per block).
template <bool kSparse, int GI, int MB>
void decode_i8_groups(const LinearArgs& a, const int64_t* g, const float* xv, int64_t r0) {
  const int64_t P = a.k_pairs;
  __m256 acc[GI][MB][4];
  __m256 tot[GI][MB][4];
  const int8_t* v[GI];
  const uint32_t* bm[GI];
  const float* sc[GI];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
    v[gi] = group_qvalues(a, g[gi]);
    bm[gi] = kSparse ? a.bitmap + g[gi] * P : nullptr;
    sc[gi] = a.scales + g[gi] * a.k_blocks * kGroupCols;
  }
  for (int64_t p0 = 0; p0 < P; p0 += kQBlockPairs) {
    const int64_t p1 = min64(P, p0 + kQBlockPairs);
    _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi)
      _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
        _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) acc[gi][m][b] = _mm256_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      __m256 x[MB];
      _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
        x[m] = _mm256_load_ps(xv + ((r0 + m) * P + p) * 8);
      _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi) {
        _mm_prefetch(reinterpret_cast<const char*>(v[gi]) + kPrefetchBytes, _MM_HINT_T0);
        uint64_t by[4];
        const int8_t* u[4];
        unit_bytes_i8<kSparse>(bm[gi], p, v[gi], by, u);
        _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
          const __m256 w = expand_byte_i8(u[b], by[b]);
          _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
            acc[gi][m][b] = _mm256_fmadd_ps(w, x[m], acc[gi][m][b]);
        }
      }
    }
    _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi)
      _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
        // Columns 4b .. 4b+3 in both lanes (j = 0 and j = 1 of the pair).
        const __m256 s = _mm256_broadcast_ps(
            reinterpret_cast<const __m128*>(sc[gi] + (p0 / kQBlockPairs) * kGroupCols + 4 * b));
        _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m)
          tot[gi][m][b] = p0 == 0 ? _mm256_mul_ps(acc[gi][m][b], s)
                                  : _mm256_fmadd_ps(acc[gi][m][b], s, tot[gi][m][b]);
      }
  }
  alignas(32) float out[kGroupCols];
  _Pragma("GCC unroll 8") for (int gi = 0; gi < GI; ++gi)
    _Pragma("GCC unroll 8") for (int m = 0; m < MB; ++m) {
      fold_bytes(tot[gi][m], out);
      store_group_row(a, g[gi], r0 + m, out);
    }
}

// Rows in the passes of for_row_passes (as decode_rows), GI groups at a time.
template <bool kSparse, int GI>
void decode_i8_rows(const LinearArgs& a, const int64_t* g, const float* xv) {
  for_row_passes(a.m, [&](auto rows, int64_t r0) {
    decode_i8_groups<kSparse, GI, decltype(rows)::value>(a, g, xv, r0);
  });
}

// The streams of decode_streams; 3 groups at M = 1 (12 accumulators), 1 for more rows.
template <bool kSparse, int GI>
void decode_i8_streams(const LinearArgs& a, int64_t g_begin, int64_t g_end, const float* xv) {
  for_stream_blocks<GI>(
      g_begin, g_end, [&](const int64_t* g) { decode_i8_rows<kSparse, GI>(a, g, xv); },
      [&](const int64_t* g) { decode_i8_rows<kSparse, 1>(a, g, xv); });
}

template <bool kSparse>
void decode_i8(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const float* xv = pair_broadcasts(a, a.m);
  if (a.m == 1) return decode_i8_streams<kSparse, 3>(a, g_begin, g_end, xv);
  decode_i8_streams<kSparse, 1>(a, g_begin, g_end, xv);
}

// K-pairs [p0, p0 + np) of group g as dequantized fp32 q * scale into panel[2 np][16].
template <bool kSparse>
inline void fill_panel_i8(const LinearArgs& a, int64_t g, int64_t p0, int64_t np,
                          const int8_t*& v, float* panel) {
  const uint32_t* bm = kSparse ? a.bitmap + g * a.k_pairs : nullptr;
  const float* sc = a.scales + g * a.k_blocks * kGroupCols;
  for (int64_t i = 0; i < np; ++i) {
    const int64_t p = p0 + i;
    uint64_t by[4];
    const int8_t* u[4];
    unit_bytes_i8<kSparse>(bm, p, v, by, u);
    const float* s = sc + (p / kQBlockPairs) * kGroupCols;
    float* row0 = panel + (2 * i) * kGroupCols;
    float* row1 = row0 + kGroupCols;
    _Pragma("GCC unroll 4") for (int b = 0; b < 4; ++b) {
      const __m256 sb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(s + 4 * b));
      const __m256 w = _mm256_mul_ps(expand_byte_i8(u[b], by[b]), sb);
      _mm_store_ps(row0 + 4 * b, _mm256_castps256_ps128(w));
      _mm_store_ps(row1 + 4 * b, _mm256_extractf128_ps(w, 1));
    }
  }
}

// prefill() with int8 panels.
template <bool kSparse>
void prefill_i8(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  constexpr int GI = kPanelGroups;
  constexpr int64_t cs = GI * kGroupCols;
  alignas(32) static thread_local float panel[GI][2 * kPanelPairs * kGroupCols];
  const int64_t P = a.k_pairs, xs = 2 * P;
  float* xf = x_as_float(a);
  auto* c = static_cast<float*>(std::aligned_alloc(32, ((a.m * cs * 4 + 31) / 32) * 32));
  if (!c) std::abort();
  for (int64_t g0 = g_begin; g0 < g_end; g0 += GI) {
    const int ng = static_cast<int>(min64(GI, g_end - g0));
    const int8_t* v[GI];
    for (int gi = 0; gi < ng; ++gi) v[gi] = group_qvalues(a, g0 + gi);
    for (int64_t p0 = 0; p0 < P; p0 += kPanelPairs) {
      const int64_t np = min64(kPanelPairs, P - p0);
      for (int gi = 0; gi < ng; ++gi)
        fill_panel_i8<kSparse>(a, g0 + gi, p0, np, v[gi], panel[gi]);
      for (int64_t r0 = 0; r0 < a.m; r0 += kPanelRows) {
        const int rows = static_cast<int>(min64(kPanelRows, a.m - r0));
        for (int gi = 0; gi < ng; ++gi)
          panel_rows(rows, panel[gi], 2 * np, xf, xs, 2 * p0, r0, c + gi * kGroupCols, cs,
                     p0 == 0);
      }
    }
    for (int64_t r = 0; r < a.m; ++r)
      for (int gi = 0; gi < ng; ++gi) store_group_row(a, g0 + gi, r, c + r * cs + gi * kGroupCols);
  }
  std::free(c);
  std::free(xf);
}

}  // namespace

void linear_avx2(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const bool sparse = a.bitmap != nullptr;
  if (a.m <= kDecodeMaxRows) {
    sparse ? decode<true>(a, g_begin, g_end) : decode<false>(a, g_begin, g_end);
  } else {
    sparse ? prefill<true>(a, g_begin, g_end) : prefill<false>(a, g_begin, g_end);
  }
}

void linear_int8_avx2(const LinearArgs& a, int64_t g_begin, int64_t g_end) {
  const bool sparse = a.bitmap != nullptr;
  if (a.m <= kDecodeMaxRows) {
    sparse ? decode_i8<true>(a, g_begin, g_end) : decode_i8<false>(a, g_begin, g_end);
  } else {
    sparse ? prefill_i8<true>(a, g_begin, g_end) : prefill_i8<false>(a, g_begin, g_end);
  }
}

}  // namespace sparamx

#pragma GCC pop_options
