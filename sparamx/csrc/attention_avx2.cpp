// AVX2+FMA decode attention over the sparse KV cache (Zen 2/3, Haswell and later: no
// AVX-512, no bf16 dot product). Same contract and flash-decoding state as
// attention_avx512.cpp; fp32 products (vfmadd231ps) and fp32 softmax weights.
//
// bf16 -> fp32 without a convert instruction: a 32-bit lane holding the bf16 pair
// (x_even, x_odd) gives x_even as fp32 after a 16-bit left shift and x_odd after masking
// off the low half (vpslld / vpand, no shuffle). So a 16-value load becomes two fp32
// vectors, "even" and "odd" elements. What that means per layout:
//   dense rows  the two vectors hold dimensions 0, 2, .., 14 and 1, 3, .., 15 of each
//               16-dimension chunk: q is kept in the same order (`qeo`), and the V
//               accumulators too (put back in dimension order when the segment ends);
//   a mask per token: each mask byte (8 dimensions) expands the token's kept values
//               straight to 8 fp32 lanes with one vpshufb: the 16 bytes at the byte's
//               value offset are broadcast to both 128-bit halves, and a 256-entry
//               table of shuffle controls (indexed by the mask byte) puts kept value r
//               into the high half of its lane and zeroes the rest. Offsets advance by
//               the byte's popcount; dimension order, so q and acc are too;
//   masks shared by 16 tokens (the block layouts of attention.h): no expand at all.
//               K [pair][token][2]: one load is 8 tokens' values of kept dims (2p,
//               2p+1): even = dim 2p, odd = dim 2p+1 of 8 tokens, multiplied by q at
//               those two dims (broadcast through a per-block list of kept positions),
//               so the scores come out as vectors over tokens (no reductions).
//               V [token pair][dim][2]: even = token 2u, odd = token 2u+1 over 8 kept
//               dims, multiplied by the pair's weights into sums over the kept dims
//               (`flat`), which a vpermps per mask byte (index table) spreads into
//               the dense accumulators. Work shrinks with sparsity.
// Dense and per-token rows go through `segment`: per block of 16 tokens, scores (8-lane
// partial dot products per token and head, reduced 8 tokens at a time by an hadd tree),
// the online softmax (log2 domain), then V passes over the block's rows (in L1/L2: each
// V row is prefetched while the same token's K row is read) with accumulators for a few
// 16-dimension chunks and query heads in registers. The softmax weights are stored
// broadcast (one ymm per token and head), so every V multiply takes its weight as a
// memory operand. Each compressed K/V byte comes from DRAM once per KV head for all the
// query heads of the call.
//
// Headers come before the target pragma and no std:: template is used after it (see
// kernel_avx512.cpp: an inline function built for AVX2 here could be the copy the linker
// keeps for every caller, and crash the portable path on a CPU without AVX2).
#include <math.h>

#include <cstdint>

#include "attention.h"
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

namespace sparamx {
namespace {

constexpr int kBlock = 16;  // tokens per score reduction and softmax step
constexpr int kMaxD = 256;  // row stride of the kernel's q and accumulator buffers
constexpr int kPad = 16;    // spare bf16 after a copied row (the expand reads 8 ahead)

// Lookup tables indexed by a mask byte (8 dimensions), built at compile time.
struct Tables {
  // vpshufb controls: lane j (dimension 8k + j) <- kept value r = popcount of the bits
  // below j, as the high half of an fp32 (bytes 2r, 2r+1 of the broadcast 16 bytes);
  // a pruned lane -> 0. Lanes 0-3 come from the low 128-bit half, 4-7 from the high.
  alignas(32) uint8_t expand[256][32];
  // vpermps indices: lane j <- element r of 8 sums in kept order; a pruned lane has
  // the sign bit set (a blend then zeroes it).
  alignas(32) int32_t spread[256][8];
  // positions of the set bits, one per byte in order (unused bytes 0)
  uint64_t pos[256];
  constexpr Tables() : expand(), spread(), pos() {
    for (int m = 0; m < 256; ++m) {
      int r = 0;
      uint64_t p = 0;
      for (int j = 0; j < 8; ++j) {
        const int at = 16 * (j / 4) + 4 * (j % 4);
        const bool kept = (m >> j) & 1;
        expand[m][at] = 0x80;
        expand[m][at + 1] = 0x80;
        expand[m][at + 2] = kept ? static_cast<uint8_t>(2 * r) : 0x80;
        expand[m][at + 3] = kept ? static_cast<uint8_t>(2 * r + 1) : 0x80;
        spread[m][j] = kept ? r : -2147483647 - 1;
        if (kept) {
          p |= static_cast<uint64_t>(j) << (8 * r);
          ++r;
        }
      }
      pos[m] = p;
    }
  }
};
constexpr Tables kTab{};

struct Rows {             // where token rows of one side live, for one (b, h)
  const uint16_t* vals;   // token t's row starts at vals + t * stride
  int64_t stride;
  const uint32_t* bits;   // a mask per token: t's words at bits + t * words; per 16
                          // tokens: block i's at bits + i * words; dense: nullptr
  const uint16_t* end;    // end of the whole values tensor (per-token masks: the expand
                          // reads up to 8 values past a row's kept ones; see safe_row)
};

enum Layout { kDense, kToken };  // shared masks: `blocked_segment`

template <int L>
struct Lay {
  static constexpr int value = L;
};

inline __m256 even_f32(__m256i x) {  // elements 0, 2, .., 14 of 16 bf16, as fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline __m256 odd_f32(__m256i x) {  // elements 1, 3, .., 15
  return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(-65536)));
}
inline __m256i lanes_below(int n) {  // 32-bit lanes i < n all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 16 bf16 of a dense row from p, of which `left` are inside the row (no read past it:
// the row may be the last of its tensor). Only head_dims that are not a multiple of 16
// take the slow branches.
inline __m256i load_row16(const uint16_t* p, int64_t left) {
  if (left >= 16) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (!(left & 1))  // whole 32-bit pairs: a masked load (masked lanes never fault)
    return _mm256_maskload_epi32(reinterpret_cast<const int*>(p),
                                 lanes_below(static_cast<int>(left / 2)));
  alignas(32) uint16_t t[16];
  for (int i = 0; i < 16; ++i) t[i] = i < left ? p[i] : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

// Dimensions 8k .. 8k+7 of a per-token-mask row: `byte` is mask byte k, `off` the
// number of kept values before it.
inline __m256 expand8(const uint16_t* row, int off, unsigned byte) {
  const __m256i src =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
  const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTab.expand[byte]));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl));
}

// Token t's row of a per-token-mask side; a row whose 8-value over-read would pass the
// end of the tensor (only its last rows) is copied into buf first.
inline const uint16_t* safe_row(const Rows& r, int64_t t, uint16_t* buf) {
  const uint16_t* p = r.vals + t * r.stride;
  if (p + r.stride + 8 <= r.end) return p;
  for (int64_t i = 0; i < r.stride; ++i) buf[i] = p[i];
  for (int i = 0; i < kPad; ++i) buf[r.stride + i] = 0;
  return buf;
}

inline const uint8_t* mask_bytes(const uint32_t* words) {
  return reinterpret_cast<const uint8_t*>(words);  // byte k = dimensions 8k .. 8k+7
}

inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// v: 8 consecutive vectors of 8 floats -> lane i = the sum of vector i's lanes.
inline __m256 reduce8(const float* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_load_ps(v), _mm256_load_ps(v + 8));
  const __m256 t1 = _mm256_hadd_ps(_mm256_load_ps(v + 16), _mm256_load_ps(v + 24));
  const __m256 t2 = _mm256_hadd_ps(_mm256_load_ps(v + 32), _mm256_load_ps(v + 40));
  const __m256 t3 = _mm256_hadd_ps(_mm256_load_ps(v + 48), _mm256_load_ps(v + 56));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  // u0 = [sums of v0..v3 over lanes 0-3 | the same over lanes 4-7], u1 for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// 2^x for x <= 0 (and -inf -> 0): x = n + f with |f| <= 1/2, 2^f by a degree-6
// polynomial (relative error ~2e-7), then n added to the exponent.
inline __m256 exp2_ps(__m256 x) {
  const __m256 dead = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_andnot_ps(dead, _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)));
}

// One online-softmax step for one query head over a block's 16 scores (lo: tokens 0-7,
// hi: 8-15; log2 domain, -inf for absent tokens). Rescales l, lv and acc[n_acc] only
// when a score beats the running max; writes each weight broadcast to pb[16][8] (the V
// loops take it as a memory operand); lv sums the weights per lane until the segment
// ends (then added to l).
__attribute__((always_inline)) inline void softmax_step(__m256 lo, __m256 hi, float& m,
                                                        float& l, __m256& lv, float* acc,
                                                        int n_acc, float (*pb)[8]) {
  const __m256 mx = _mm256_max_ps(lo, hi);
  if (_mm256_movemask_ps(_mm256_cmp_ps(mx, _mm256_set1_ps(m), _CMP_GT_OQ))) {
    const float m_new = hmax(mx);
    const float corr = exp2f(m - m_new);  // C function: 0 while m is -inf
    const __m256 cv = _mm256_set1_ps(corr);
    l *= corr;  // what earlier segments of this call summed
    lv = _mm256_mul_ps(lv, cv);
    for (int j = 0; j < n_acc; j += 8)
      _mm256_store_ps(acc + j, _mm256_mul_ps(cv, _mm256_load_ps(acc + j)));
    m = m_new;
  }
  const __m256 mv = _mm256_set1_ps(m);
  const __m256 plo = exp2_ps(_mm256_sub_ps(lo, mv)), phi = exp2_ps(_mm256_sub_ps(hi, mv));
  lv = _mm256_add_ps(lv, _mm256_add_ps(plo, phi));
  alignas(32) float p[kBlock];
  _mm256_store_ps(p, plo);
  _mm256_store_ps(p + 8, phi);
  for (int i = 0; i < kBlock; ++i) _mm256_store_ps(pb[i], _mm256_broadcast_ss(p + i));
}

// ---- Dense rows and a mask per token

// A value in a register from here on: keeps gcc from folding its load into every FMA
// that uses it (each folded copy is one more load; the loops below are bound by the
// two 256-bit loads Zen 2/3 issue per cycle as much as by the FMAs).
inline __m256 in_reg(__m256 x) {
  asm("" : "+x"(x));
  return x;
}

// Chunk c (16 dimensions) of a K or V row as two fp32 vectors in the layout's lane
// order (see the file comment). Per-token masks: `mb` the row's mask bytes and `off`
// the value offset of byte 2c (advanced past chunk c). FULL: every chunk is whole
// (head_dim a multiple of 16), no tail checks.
template <int L, bool FULL>
inline void load_chunk(const uint16_t* row, int c, int64_t d, const uint8_t* mb, int& off,
                       __m256& x0, __m256& x1) {
  if constexpr (L == kToken) {
    const unsigned b0 = mb[2 * c], b1 = mb[2 * c + 1];
    x0 = expand8(row, off, b0);
    off += _mm_popcnt_u32(b0);
    x1 = expand8(row, off, b1);
    off += _mm_popcnt_u32(b1);
  } else {
    const __m256i raw =
        FULL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * c))
             : load_row16(row + 16 * c, d - 16 * c);
    x0 = even_f32(raw);
    x1 = odd_f32(raw);
  }
}

// Scores of TB consecutive tokens (t, .., t+TB-1) for G query heads: per token and head
// 8 lanes of partial sums, stored to sbuf[g][i + j] for `reduce8`. q [G][kMaxD] in the
// K layout's lane order, read as memory operands of the FMAs (G * 2 * NCH vectors would
// not fit in 16 registers).
template <int G, int TB, int NCH, int KL>
inline void score_tokens(const Rows& kr, int64_t t, int nch_rt, int words, int64_t d,
                         const float* q, float (*sbuf)[kBlock][8], int i) {
  constexpr int NA = G <= 2 ? 2 : 1;  // small groups: two sums per token (more FMA chains)
  const int nch = NCH > 0 ? NCH : nch_rt;
  __m256 s[NA][TB][G];
  for (int a = 0; a < NA; ++a)
    for (int j = 0; j < TB; ++j)
      for (int g = 0; g < G; ++g) s[a][j][g] = _mm256_setzero_ps();
  const uint16_t* row[TB];
  const uint8_t* mb[TB];
  int off[TB];
  alignas(32) uint16_t tmp[KL == kToken ? TB : 1][kMaxD + kPad];
  for (int j = 0; j < TB; ++j) {
    off[j] = 0;
    if constexpr (KL == kToken) {
      row[j] = safe_row(kr, t + j, tmp[j]);
      mb[j] = mask_bytes(kr.bits + (t + j) * words);
    } else {
      row[j] = kr.vals + (t + j) * kr.stride;
      mb[j] = nullptr;
    }
  }
  _Pragma("GCC unroll 16") for (int c = 0; c < nch; ++c) {
    __m256 x0[TB], x1[TB];
    for (int j = 0; j < TB; ++j)
      load_chunk<KL, (NCH > 0)>(row[j], c, d, mb[j], off[j], x0[j], x1[j]);
    for (int g = 0; g < G; ++g) {  // each q vector loaded once for the TB tokens
      const float* qg = q + g * kMaxD + 16 * c;
      const __m256 q0 = TB > 1 ? in_reg(_mm256_load_ps(qg)) : _mm256_load_ps(qg);
      const __m256 q1 = TB > 1 ? in_reg(_mm256_load_ps(qg + 8)) : _mm256_load_ps(qg + 8);
      for (int j = 0; j < TB; ++j) {
        s[0][j][g] = _mm256_fmadd_ps(x0[j], q0, s[0][j][g]);
        s[NA - 1][j][g] = _mm256_fmadd_ps(x1[j], q1, s[NA - 1][j][g]);
      }
    }
  }
  for (int j = 0; j < TB; ++j)
    for (int g = 0; g < G; ++g) {
      __m256 v = s[0][j][g];
      if constexpr (NA > 1) v = _mm256_add_ps(v, s[1][j][g]);
      _mm256_store_ps(sbuf[g][i + j], v);
    }
}

// One V pass: chunks c0 .. c0+WB-1 of the block's nc rows into the accumulators of query
// heads g0 .. g0+GB-1 (2 * WB * GB of them in registers).
template <int GB, int WB, int VL, bool FULL>
inline void v_pass(const uint16_t* const* vrow, const uint8_t* const* vmb, const int (*voff)[33],
                   int nc, int c0, int64_t d, const float (*pb)[kBlock][8], float* acc, int g0) {
  __m256 a[WB][GB][2];
  for (int b = 0; b < WB; ++b)
    for (int g = 0; g < GB; ++g)
      for (int h = 0; h < 2; ++h)
        a[b][g][h] = _mm256_load_ps(acc + (g0 + g) * kMaxD + 16 * (c0 + b) + 8 * h);
  for (int i = 0; i < nc; ++i) {
    for (int b = 0; b < WB; ++b) {
      int off = VL == kToken ? voff[i][2 * (c0 + b)] : 0;
      __m256 x0, x1;
      load_chunk<VL, FULL>(vrow[i], c0 + b, d, VL == kToken ? vmb[i] : nullptr, off, x0, x1);
      for (int g = 0; g < GB; ++g) {
        const __m256 p = in_reg(_mm256_load_ps(pb[g0 + g][i]));  // one load, two FMAs
        a[b][g][0] = _mm256_fmadd_ps(x0, p, a[b][g][0]);
        a[b][g][1] = _mm256_fmadd_ps(x1, p, a[b][g][1]);
      }
    }
  }
  for (int b = 0; b < WB; ++b)
    for (int g = 0; g < GB; ++g)
      for (int h = 0; h < 2; ++h)
        _mm256_store_ps(acc + (g0 + g) * kMaxD + 16 * (c0 + b) + 8 * h, a[b][g][h]);
}

// NCH > 0: head_dim = 16 NCH, a constant (64 and 128: loops unrolled, no row tails);
// 0: nch_rt chunks at run time, the last one possibly partial. q [G][kMaxD] and acc
// [G][kMaxD] in the lane orders of the K and V layouts.
template <int G, int NCH, int KL, int VL>
void segment(const Rows& kr, const Rows& vr, int64_t n, int nch_rt, int words, int64_t d,
             float scale, const float* q, float* m, float* l, float* acc) {
  // Tokens per score step and V chunks / heads per pass: 8-12 FMA chains in registers
  // (measured on Zen 3 with L2-resident rows: 90-97% of 2 FMAs per cycle for G = 2..8).
  constexpr int TB = G == 1 ? 4 : G <= 4 ? 2 : 1;
  constexpr int WB = G == 1 ? 4 : G == 2 ? 2 : 1;
  constexpr int GB = G <= 4 ? G : (G + 1) / 2;
  const int nch = NCH > 0 ? NCH : nch_rt;
  alignas(32) float sbuf[G][kBlock][8];
  alignas(32) float pb[G][kBlock][8];
  alignas(32) uint16_t vtmp[VL == kToken ? kBlock : 1][kMaxD + kPad];
  const uint16_t* vrow[kBlock];
  const uint8_t* vmb[kBlock];
  int voff[VL == kToken ? kBlock : 1][33];
  const int64_t vrow_bytes = vr.stride * 2;
  __m256 lv[G];
  for (int g = 0; g < G; ++g) lv[g] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int nc = static_cast<int>(n - c0 < kBlock ? n - c0 : kBlock);
    // Each token's V row (and the block's V masks) on its way to L2 while the same
    // token's K row is read: both streams stay in flight, and the V passes below
    // re-read the rows from cache. (Per token, as the AVX-512 kernel measured best: one
    // burst of a block's prefetches at its start, or a block ahead, streamed no faster
    // here.)
    if constexpr (VL == kToken)
      _mm_prefetch(reinterpret_cast<const char*>(vr.bits + c0 * words), _MM_HINT_T1);
    auto prefetch_v = [&](int64_t t) {
      const char* vp = reinterpret_cast<const char*>(vr.vals + t * vr.stride);
      for (int64_t x = 0; x < vrow_bytes; x += 64) _mm_prefetch(vp + x, _MM_HINT_T1);
    };
    int i = 0;
    for (; i + TB <= nc; i += TB) {
      for (int j = 0; j < TB; ++j) prefetch_v(c0 + i + j);
      score_tokens<G, TB, NCH, KL>(kr, c0 + i, nch, words, d, q, sbuf, i);
    }
    for (; i < nc; ++i) {
      prefetch_v(c0 + i);
      score_tokens<G, 1, NCH, KL>(kr, c0 + i, nch, words, d, q, sbuf, i);
    }
    for (; i < kBlock; ++i)
      for (int g = 0; g < G; ++g) _mm256_store_ps(sbuf[g][i], _mm256_setzero_ps());
    const __m256 live_lo = _mm256_castsi256_ps(lanes_below(nc));
    const __m256 live_hi = _mm256_castsi256_ps(lanes_below(nc - 8));
    const __m256 ninf = _mm256_set1_ps(-INFINITY), sv = _mm256_set1_ps(scale);
    for (int g = 0; g < G; ++g) {
      const __m256 lo = _mm256_mul_ps(reduce8(sbuf[g][0]), sv);
      const __m256 hi = _mm256_mul_ps(reduce8(sbuf[g][8]), sv);
      softmax_step(_mm256_blendv_ps(ninf, lo, live_lo), _mm256_blendv_ps(ninf, hi, live_hi),
                   m[g], l[g], lv[g], acc + g * kMaxD, 16 * nch, pb[g]);
    }
    for (int t = 0; t < nc; ++t) {
      if constexpr (VL == kToken) {
        vrow[t] = safe_row(vr, c0 + t, vtmp[t]);
        vmb[t] = mask_bytes(vr.bits + (c0 + t) * words);
        int o = 0;
        for (int k = 0; k < 2 * nch; ++k) {
          voff[t][k] = o;
          o += _mm_popcnt_u32(vmb[t][k]);
        }
      } else {
        vrow[t] = vr.vals + (c0 + t) * vr.stride;
        vmb[t] = nullptr;
      }
    }
    // V passes: WB chunks for GB heads at a time; a second head group re-reads the
    // block's rows from L1.
    int c = 0;
    for (; c + WB <= nch; c += WB) {
      v_pass<GB, WB, VL, (NCH > 0)>(vrow, vmb, voff, nc, c, d, pb, acc, 0);
      if constexpr (G > GB)
        v_pass<G - GB, WB, VL, (NCH > 0)>(vrow, vmb, voff, nc, c, d, pb, acc, GB);
    }
    if constexpr (NCH == 0 || NCH % WB != 0)  // (a dead loop here upsets gcc's analysis)
      for (; c < nch; ++c) {
        v_pass<GB, 1, VL, (NCH > 0)>(vrow, vmb, voff, nc, c, d, pb, acc, 0);
        if constexpr (G > GB)
          v_pass<G - GB, 1, VL, (NCH > 0)>(vrow, vmb, voff, nc, c, d, pb, acc, GB);
      }
  }
  for (int g = 0; g < G; ++g) l[g] += hsum(lv[g]);
}

// ---- Masks shared by 16 tokens: the block layouts (attention.h, file comment)

constexpr int kFlat = kMaxD + 8;  // fp32 per head: V sums in kept order and a read's overrun

// Block scores for halves H0 .. H0+NH-1 (tokens 8h .. 8h+7) and G heads: s[h][g] += the
// kept-dimension products. kb: the block's K, kp whole kept-dim pairs (an odd last dim
// at kb + 32 kp, 16 tokens in a row), kidx the kept dims, q [G][kMaxD] dimension order.
template <int G, int H0, int NH>
inline void block_scores(const uint16_t* kb, int kp, bool odd, const uint8_t* kidx,
                         const float* q, __m256 (*s)[G]) {
  constexpr int NA = G <= 2 ? 2 : 1;  // small groups: separate even/odd sums (FMA chains)
  __m256 a[NA][NH][G];
  for (int x = 0; x < NA; ++x)
    for (int h = 0; h < NH; ++h)
      for (int g = 0; g < G; ++g) a[x][h][g] = _mm256_setzero_ps();
  for (int p = 0; p < kp; ++p) {
    const int i0 = kidx[2 * p], i1 = kidx[2 * p + 1];
    __m256 e[NH], o[NH];
    for (int h = 0; h < NH; ++h) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + 32 * p + 16 * (H0 + h)));
      e[h] = even_f32(raw);
      o[h] = odd_f32(raw);
    }
    for (int g = 0; g < G; ++g) {
      const __m256 qa = _mm256_broadcast_ss(q + g * kMaxD + i0);
      const __m256 qb = _mm256_broadcast_ss(q + g * kMaxD + i1);
      for (int h = 0; h < NH; ++h) {
        a[0][h][g] = _mm256_fmadd_ps(e[h], qa, a[0][h][g]);
        a[NA - 1][h][g] = _mm256_fmadd_ps(o[h], qb, a[NA - 1][h][g]);
      }
    }
  }
  if (odd) {
    const int il = kidx[2 * kp];
    for (int h = 0; h < NH; ++h) {
      const __m128i raw =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(kb + 32 * kp + 8 * (H0 + h)));
      const __m256 kl = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      for (int g = 0; g < G; ++g)
        a[0][h][g] = _mm256_fmadd_ps(kl, _mm256_broadcast_ss(q + g * kMaxD + il), a[0][h][g]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int g = 0; g < G; ++g) {
      __m256 v = a[0][h][g];
      if constexpr (NA > 1) v = _mm256_add_ps(v, a[1][h][g]);
      s[H0 + h][g] = _mm256_add_ps(s[H0 + h][g], v);
    }
}

// One V pass over a block: kept-dim chunks c0 .. c0+CB-1 (8 dims each) for heads g0 ..
// g0+GB-1, sums to flat. vb: the block, kv kept values per token, vc chunks in all (the
// last read with a lane mask: only kv - 8 (vc - 1) of its lanes are in the block).
template <int CB, int GB>
inline void blocked_v_pass(const uint16_t* vb, int kv, int c0, int vc, __m256i last,
                           const float (*pb)[kBlock][8], int g0, float (*flat)[kFlat]) {
  __m256 a[CB][GB];
  for (int c = 0; c < CB; ++c)
    for (int g = 0; g < GB; ++g) a[c][g] = _mm256_setzero_ps();
  for (int u = 0; u < kBlock / 2; ++u) {
    for (int c = 0; c < CB; ++c) {
      const uint16_t* src = vb + u * 2 * kv + 16 * (c0 + c);
      const __m256i raw =
          c0 + c == vc - 1
              ? _mm256_maskload_epi32(reinterpret_cast<const int*>(src), last)
              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256 e = even_f32(raw), o = odd_f32(raw);  // tokens 2u and 2u + 1
      for (int g = 0; g < GB; ++g) {
        a[c][g] = _mm256_fmadd_ps(e, _mm256_load_ps(pb[g0 + g][2 * u]), a[c][g]);
        a[c][g] = _mm256_fmadd_ps(o, _mm256_load_ps(pb[g0 + g][2 * u + 1]), a[c][g]);
      }
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int g = 0; g < GB; ++g) _mm256_store_ps(flat[g0 + g] + 8 * (c0 + c), a[c][g]);
}

template <int GB, int CB>
inline void blocked_v_chunks(int cb, const uint16_t* vb, int kv, int c0, int vc, __m256i last,
                             const float (*pb)[kBlock][8], int g0, float (*flat)[kFlat]) {
  if constexpr (CB > 1) {
    if (cb < CB) return blocked_v_chunks<GB, CB - 1>(cb, vb, kv, c0, vc, last, pb, g0, flat);
  }
  blocked_v_pass<CB, GB>(vb, kv, c0, vc, last, pb, g0, flat);
}

// flat (G heads' V sums over a block's kept dims, in order) spread by the block's V mask
// bytes and added to acc (dimension order).
template <int G>
inline void spread_add(const float (*flat)[kFlat], const uint8_t* mb, int nbytes, float* acc) {
  int off = 0;
  const __m256 zero = _mm256_setzero_ps();
  for (int k = 0; k < nbytes; ++k) {
    const unsigned byte = mb[k];
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTab.spread[byte]));
    for (int g = 0; g < G; ++g) {
      __m256 e = _mm256_permutevar8x32_ps(_mm256_loadu_ps(flat[g] + off), idx);
      e = _mm256_blendv_ps(e, zero, _mm256_castsi256_ps(idx));
      float* ag = acc + g * kMaxD + 8 * k;
      _mm256_store_ps(ag, _mm256_add_ps(_mm256_load_ps(ag), e));
    }
    off += _mm_popcnt_u32(byte);
  }
}

// Shared-mask compressed tokens: nblk whole blocks; same state as `segment`, acc in
// dimension order. qd: q in dimension order; qeo: in the dense lane order (for the key
// fill rows, which are dense). kfill: the blocks' fill rows or nullptr.
template <int G>
void blocked_segment(const Rows& kr, const Rows& vr, int64_t nblk, int words, int64_t d,
                     float scale, const float* qd, const float* qeo, const uint16_t* kfill,
                     float* m, float* l, float* acc) {
  const int kk = static_cast<int>(kr.stride), kv = static_cast<int>(vr.stride);
  const int kp = kk / 2;
  const int nbytes = static_cast<int>((d + 7) / 8), nch = static_cast<int>((d + 15) / 16);
  const int vc = (kv + 7) / 8;  // V chunks of 8 kept dims
  const __m256i v_last = lanes_below(kv - 8 * (vc - 1));
  constexpr int GB = G <= 4 ? G : (G + 1) / 2;
  constexpr int CB0 = 12 / GB;  // V accumulators in registers: CB * GB <= 12
  constexpr int CB = CB0 > 8 ? 8 : CB0;
  alignas(32) uint8_t kidx[kMaxD + 8];
  alignas(32) float flat[G][kFlat];
  alignas(32) float pb[G][kBlock][8];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < kFlat; ++j) flat[g][j] = 0.f;
  const uint8_t* pending = nullptr;  // V mask of the block whose flat sums await adding
  __m256 lv[G];
  for (int g = 0; g < G; ++g) lv[g] = _mm256_setzero_ps();
  const __m256 sv = _mm256_set1_ps(scale);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint16_t* kb = kr.vals + blk * kBlock * kk;
    const uint16_t* vb = vr.vals + blk * kBlock * kv;
    // The block's kept K dimensions in order (positions < 256 fit a byte): per mask byte
    // an 8-byte table entry plus 8k in every byte, stored at the running count.
    const uint8_t* kmb = mask_bytes(kr.bits + blk * words);
    int o = 0;
    for (int k = 0; k < nbytes; ++k) {
      const unsigned byte = kmb[k];
      const uint64_t e = kTab.pos[byte] + static_cast<uint64_t>(k) * 0x0808080808080808ull;
      __builtin_memcpy(kidx + o, &e, 8);
      o += _mm_popcnt_u32(byte);
    }
    __m256 s[2][G];
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < G; ++g) s[h][g] = _mm256_setzero_ps();
    if constexpr (G <= 4) {  // both halves at once: each q broadcast serves 16 tokens
      block_scores<G, 0, 2>(kb, kp, kk & 1, kidx, qd, s);
    } else {  // 2 * G accumulators would not fit in registers
      block_scores<G, 0, 1>(kb, kp, kk & 1, kidx, qd, s);
      block_scores<G, 1, 1>(kb, kp, kk & 1, kidx, qd, s);
    }
    if (kfill) {  // the pruned entries' share of each of the block's scores: q·fill
      const uint16_t* fb = kfill + blk * words * 32;
      __m256 f[G];
      for (int g = 0; g < G; ++g) f[g] = _mm256_setzero_ps();
      for (int c = 0; c < nch; ++c) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(fb + 16 * c));
        const __m256 e = even_f32(raw), od = odd_f32(raw);
        for (int g = 0; g < G; ++g) {
          f[g] = _mm256_fmadd_ps(e, _mm256_load_ps(qeo + g * kMaxD + 16 * c), f[g]);
          f[g] = _mm256_fmadd_ps(od, _mm256_load_ps(qeo + g * kMaxD + 16 * c + 8), f[g]);
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m256 fs = _mm256_set1_ps(hsum(f[g]));
        s[0][g] = _mm256_add_ps(s[0][g], fs);
        s[1][g] = _mm256_add_ps(s[1][g], fs);
      }
    }
    // The previous block's V sums, added now rather than right after they were stored:
    // the spread reads them at unaligned offsets, which cannot take them from the store
    // queue. Before this block's softmax, which may rescale acc.
    if (pending) spread_add<G>(flat, pending, nbytes, acc);
    for (int g = 0; g < G; ++g)
      softmax_step(_mm256_mul_ps(s[0][g], sv), _mm256_mul_ps(s[1][g], sv), m[g], l[g], lv[g],
                   acc + g * kMaxD, 16 * nch, pb[g]);
    for (int c0 = 0; c0 < vc; c0 += CB) {
      const int cb = vc - c0 < CB ? vc - c0 : CB;
      blocked_v_chunks<GB, CB>(cb, vb, kv, c0, vc, v_last, pb, 0, flat);
      if constexpr (G > GB) blocked_v_chunks<G - GB, CB>(cb, vb, kv, c0, vc, v_last, pb, GB, flat);
    }
    pending = mask_bytes(vr.bits + blk * words);
  }
  if (pending) spread_add<G>(flat, pending, nbytes, acc);
  for (int g = 0; g < G; ++g) l[g] += hsum(lv[g]);
}

// Between dimension order and the dense lane order (per 16 dimensions: even, then odd).
inline void to_eo(const float* src, float* dst, int nch) {
  for (int c = 0; c < nch; ++c)
    for (int j = 0; j < 8; ++j) {
      dst[16 * c + j] = src[16 * c + 2 * j];
      dst[16 * c + 8 + j] = src[16 * c + 2 * j + 1];
    }
}
inline void from_eo(const float* src, float* dst, int nch) {
  for (int c = 0; c < nch; ++c)
    for (int j = 0; j < 8; ++j) {
      dst[16 * c + 2 * j] = src[16 * c + j];
      dst[16 * c + 2 * j + 1] = src[16 * c + 8 + j];
    }
}

template <int G>
void attend(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t t0, int64_t t1,
            float* m, float* l, float* acc_out) {
  const int words = static_cast<int>(a.words);
  const int64_t dp = a.words * 32, group = a.hq / a.hkv, d = a.d;
  const int nch = static_cast<int>((d + 15) / 16);
  alignas(32) float qd[G][kMaxD], qeo[G][kMaxD];  // q as fp32: dimension / dense lane order
  alignas(32) float acc[G][kMaxD], tmp[kMaxD];    // dimension order between segments
  for (int g = 0; g < G; ++g) {
    const uint16_t* qs = a.q + (b * a.hq + h * group + g0 + g) * dp;
    for (int j = 0; j < 16 * nch; ++j) {  // 16 nch <= dp; q is zero from d to dp
      qd[g][j] = bf16_to_float(qs[j]);
      acc[g][j] = acc_out[g * dp + j];
    }
    to_eo(qd[g], qeo[g], nch);
  }
  const int64_t bh = b * a.hkv + h;
  const int shift = a.mask_shift;
  auto comp_rows = [&](const KVSide& s) {
    return Rows{s.vals + bh * s.cap * s.keep, s.keep,
                s.bits ? s.bits + bh * (s.cap >> shift) * a.words : nullptr,
                s.vals + a.batch * a.hkv * s.cap * s.keep};
  };
  auto run = [&](auto kl, auto vl, const Rows& kr, const Rows& vr, int64_t n) {
    constexpr int KL = decltype(kl)::value, VL = decltype(vl)::value;
    const float* q = KL == kToken ? &qd[0][0] : &qeo[0][0];
    if constexpr (VL == kDense)
      for (int g = 0; g < G; ++g) {
        to_eo(acc[g], tmp, nch);
        for (int j = 0; j < 16 * nch; ++j) acc[g][j] = tmp[j];
      }
    if (d == 128)
      segment<G, 8, KL, VL>(kr, vr, n, nch, words, d, a.scale_log2e, q, m, l, &acc[0][0]);
    else if (d == 64)
      segment<G, 4, KL, VL>(kr, vr, n, nch, words, d, a.scale_log2e, q, m, l, &acc[0][0]);
    else
      segment<G, 0, KL, VL>(kr, vr, n, nch, words, d, a.scale_log2e, q, m, l, &acc[0][0]);
    if constexpr (VL == kDense)
      for (int g = 0; g < G; ++g) {
        from_eo(acc[g], tmp, nch);
        for (int j = 0; j < 16 * nch; ++j) acc[g][j] = tmp[j];
      }
  };
  const int64_t c0 = t0 < a.n_comp ? t0 : a.n_comp, c1 = t1 < a.n_comp ? t1 : a.n_comp;
  if (c1 > c0) {
    Rows kr = comp_rows(a.k), vr = comp_rows(a.v);
    kr.vals += c0 * kr.stride;
    vr.vals += c0 * vr.stride;
    if (kr.bits) kr.bits += (c0 >> shift) * a.words;  // c0: a multiple of 16 when shared
    if (vr.bits) vr.bits += (c0 >> shift) * a.words;
    const int64_t n = c1 - c0;
    const bool ks = kr.bits != nullptr, vs = vr.bits != nullptr;
    if (shift) {  // both sides have bitmaps (checked by the glue)
      const uint16_t* kfill =
          a.k.fill ? a.k.fill + (bh * (a.k.cap >> 4) + (c0 >> 4)) * a.words * 32 : nullptr;
      blocked_segment<G>(kr, vr, n / kBlock, words, d, a.scale_log2e, &qd[0][0], &qeo[0][0],
                         kfill, m, l, &acc[0][0]);
    } else if (ks && vs) {
      run(Lay<kToken>{}, Lay<kToken>{}, kr, vr, n);
    } else if (ks) {
      run(Lay<kToken>{}, Lay<kDense>{}, kr, vr, n);
    } else if (vs) {
      run(Lay<kDense>{}, Lay<kToken>{}, kr, vr, n);
    } else {
      run(Lay<kDense>{}, Lay<kDense>{}, kr, vr, n);
    }
  }
  const int64_t w0 = (t0 > a.n_comp ? t0 : a.n_comp) - a.n_comp, w1 = t1 - a.n_comp;
  if (w1 > w0) {
    const uint16_t* kw = a.k.win + b * a.k.win_sb + h * a.k.win_sh + w0 * a.k.win_st;
    const uint16_t* vw = a.v.win + b * a.v.win_sb + h * a.v.win_sh + w0 * a.v.win_st;
    const Rows kr{kw, a.k.win_st, nullptr, nullptr}, vr{vw, a.v.win_st, nullptr, nullptr};
    run(Lay<kDense>{}, Lay<kDense>{}, kr, vr, w1 - w0);
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 16 * nch; ++j) acc_out[g * dp + j] = acc[g][j];
}

}  // namespace

void attention_avx2(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng, int64_t t0,
                    int64_t t1, float* m, float* l, float* acc) {
  switch (ng) {
    case 1: return attend<1>(a, b, h, g0, t0, t1, m, l, acc);
    case 2: return attend<2>(a, b, h, g0, t0, t1, m, l, acc);
    case 3: return attend<3>(a, b, h, g0, t0, t1, m, l, acc);
    case 4: return attend<4>(a, b, h, g0, t0, t1, m, l, acc);
    case 5: return attend<5>(a, b, h, g0, t0, t1, m, l, acc);
    case 6: return attend<6>(a, b, h, g0, t0, t1, m, l, acc);
    case 7: return attend<7>(a, b, h, g0, t0, t1, m, l, acc);
    default: return attend<8>(a, b, h, g0, t0, t1, m, l, acc);
  }
}

}  // namespace sparamx

#pragma GCC pop_options
