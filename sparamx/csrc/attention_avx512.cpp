// AVX-512-BF16 decode attention over the sparse KV cache (Zen 4, Cooper Lake, SPR+).
//
// One call handles one KV head, up to 8 of its query heads and a token range. Tokens go
// in blocks of kBlock = 16, each in three phases:
//   scores  per token, each 32-dimension chunk of K is loaded once (sparse: a masked
//           load of the chunk's kept values, expanded in registers with the bitmap word;
//           vpexpandw) and multiplied into one fp32 accumulator per query head with
//           vdpbf16ps; 16 tokens' accumulators are reduced together by a transpose tree
//           (about 3 instructions per score instead of ~8 for a lone reduction). The same
//           token's V row is prefetched meanwhile (why: see `segment`);
//   softmax online, per block (a max and a rescale only when a score beats the
//           running max);
//   values  tokens in pairs (`v_pass`), per 32-dimension chunk: both tokens' chunks
//           loaded (and expanded) once, interleaved, and multiplied by the pair's softmax
//           weights (bf16) with one vdpbf16ps per query head and half-chunk (accumulators
//           hold dimensions in the interleaved order and are put back in order when the
//           call ends).
// So each compressed K/V byte is read once per KV head for all query heads of its group.
// Masks shared by 16 tokens have their own block layouts and loop (`blocked_segment`),
// whose multiplies run over the kept values only: work shrinks with sparsity.
//
// Headers come before the target pragma (see kernel_avx512.cpp for why).
#include <math.h>

#include <cstdint>

#include "attention.h"
#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,popcnt,bmi2")
#include <immintrin.h>

#include "expand_avx512.h"

namespace sparamx {
namespace {

constexpr int kBlock = 16;  // tokens per score reduction and softmax step

struct Rows {             // where token rows of one side live, for one (b, h)
  const uint16_t* vals;   // token t's row starts at vals + t * stride
  int64_t stride;
  const uint32_t* bits;   // a mask per token: t's words at bits + t * words; per 16
                          // tokens: block i's at bits + i * words; dense: nullptr
};

// 2^x for x <= 0 (and -inf -> 0): x = n + f with |f| <= 1/2, 2^f by a degree-6
// polynomial (relative error ~2e-7), then scaled by 2^n.
inline __m512 exp2_ps(__m512 x) {
  const __mmask16 dead = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~dead), _mm512_scalef_ps(p, n));
}

// v[i * stride] (16 vectors of 16 floats) -> out lane i = sum of v[i]'s lanes.
inline __m512 reduce16(const float* v, int stride) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: lanes 0-7 from v[2i], 8-15 from v[2i+1]
    const __m512 x = _mm512_load_ps(v + 2 * i * stride),
                 y = _mm512_load_ps(v + (2 * i + 1) * stride);
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // 128-bit lane j: 4 partial sums of v[4i + j]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]),
                         _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  // lane 4L + j now holds the sum of v[4j + L]
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44),
                                 _mm512_shuffle_ps(c[0], c[1], 0xEE));
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, d);
}

// How one side's rows are stored in `segment` (see attention.h): no mask, or a mask per
// token. (Masks shared by 16 tokens have their own layouts and `blocked_segment`.)
enum Layout { kDense, kToken };

template <int L>
struct Lay {
  static constexpr int value = L;
};

inline __mmask32 dense_mask(int64_t d, int w) {  // lanes of chunk w below d
  const int64_t left = d - 32 * w;
  if (left <= 0) return 0;
  return left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1u);
}

// Chunk w (32 dimensions) of a token's row; `off` is the sparse row's running value
// offset (the popcount of words < w).
template <bool kSparse>
inline __m512i load_chunk(const Rows& r, int64_t t, int w, int words, __mmask32 dm, int& off) {
  if constexpr (kSparse) {
    const uint32_t bits = r.bits[t * words + w];
    const int cnt = _mm_popcnt_u32(bits);
    const __m512i packed =
        _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, cnt), r.vals + t * r.stride + off);
    off += cnt;
    return sparamx_expand_unit(bits, packed);
  } else {
    return _mm512_maskz_loadu_epi16(dm, r.vals + t * r.stride + 32 * w);
  }
}

// One V pass: adds the chunk's weighted values for query heads g0 .. g0+GB-1 into their
// accumulators (see the V loop in `segment`), WB 32-dimension chunks at a time.
template <int GB, int WB, bool VS>
inline void v_pass(const Rows& vr, int64_t c0, int nc, int words, const __mmask32* dm,
                   const int (*voff)[8], const uint32_t (*pp)[kBlock / 2], float* acc, int g0) {
  for (int w0 = 0; w0 < words; w0 += WB) {
    __m512 alo[WB][GB], ahi[WB][GB];
    for (int b = 0; b < WB; ++b)
      for (int g = 0; g < GB; ++g) {
        alo[b][g] = _mm512_load_ps(acc + ((g0 + g) * words + w0 + b) * 32);
        ahi[b][g] = _mm512_load_ps(acc + ((g0 + g) * words + w0 + b) * 32 + 16);
      }
    for (int i = 0; i < nc; i += 2) {
      __m512bh pg[GB];
      for (int g = 0; g < GB; ++g)
        pg[g] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g0 + g][i / 2]));
      for (int b = 0; b < WB; ++b) {
        const int w = w0 + b;
        int o0 = 0, o1 = 0;
        if constexpr (VS) {
          o0 = voff[i][w];
          o1 = i + 1 < nc ? voff[i + 1][w] : 0;
        }
        const __m512i v0 = load_chunk<VS>(vr, c0 + i, w, words, dm[w], o0);
        const __m512i v1 = i + 1 < nc ? load_chunk<VS>(vr, c0 + i + 1, w, words, dm[w], o1)
                                      : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
        for (int g = 0; g < GB; ++g) {
          alo[b][g] = _mm512_dpbf16_ps(alo[b][g], lo, pg[g]);
          ahi[b][g] = _mm512_dpbf16_ps(ahi[b][g], hi, pg[g]);
        }
      }
    }
    for (int b = 0; b < WB; ++b)
      for (int g = 0; g < GB; ++g) {
        _mm512_store_ps(acc + ((g0 + g) * words + w0 + b) * 32, alo[b][g]);
        _mm512_store_ps(acc + ((g0 + g) * words + w0 + b) * 32 + 16, ahi[b][g]);
      }
  }
}

// One online-softmax step for one query head: sv holds up to 16 scores (log2 domain;
// -inf for absent tokens). Updates m, l, lv and rescales acc[n_acc] only when a score
// beats the running max; writes the weights as bf16 pairs to pp[8] (P·V multiplies in
// bf16, as FlashAttention does; lv sums the same rounded weights, per lane).
inline void softmax_step(__m512 sv, float& m, float& l, __m512& lv, float* acc, int n_acc,
                         uint32_t* pp) {
  if (_mm512_cmp_ps_mask(sv, _mm512_set1_ps(m), _CMP_GT_OQ)) {
    const float m_new = _mm512_reduce_max_ps(sv);
    const float corr = exp2f(m - m_new);  // C function: no std:: inline built here
    const __m512 cv = _mm512_set1_ps(corr);
    l *= corr;
    lv = _mm512_mul_ps(lv, cv);
    for (int j = 0; j < n_acc; j += 16)
      _mm512_store_ps(acc + j, _mm512_mul_ps(cv, _mm512_load_ps(acc + j)));
    m = m_new;
  }
  const __m512 pv = exp2_ps(_mm512_sub_ps(sv, _mm512_set1_ps(m)));
  const __m256bh pb = _mm512_cvtneps_pbh(pv);
  _mm256_store_si256(reinterpret_cast<__m256i*>(pp), (__m256i)pb);
  lv = _mm512_add_ps(
      lv, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)pb), 16)));
}

// W > 0: the number of 32-dimension chunks as a constant (fully unrolled loops, the
// common head_dims 64 and 128); W == 0: `words_rt` at run time.
//
// Memory access, measured on Zen 4 with DRAM-resident caches (8k tokens): the V rows
// are read whole per pass (see the V loop) and each is prefetched into L2 while the K
// phase reads the same token's K row, so both streams stay in flight. Together these
// took Llama-3 heads (32, 8, 128) from ~9 GB/s to 20-24 GB/s with 1 thread (the probe
// reads 21-24). Longer softmax steps (32 to 512 tokens, with the scores of several
// blocks kept) were tried: none beat 16 once V rows are read whole.
// The accumulators of chunk w hold [lo 16 | hi 16] fp32 lanes from vpunpck{l,h}wd: lane
// j of lo is dimension 8 (j / 4) + j % 4, of hi the same + 4. Two two-source permutes
// per chunk convert between that order and dimension order (idx < 16: the first
// source's lane, else the second's lane idx - 16).
inline __m512i to_lanes_lo() {
  return _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
}
inline __m512i to_lanes_hi() {
  return _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline __m512i to_dims_lo() {
  return _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
}
inline __m512i to_dims_hi() {
  return _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline void permute_chunk(const float* src, float* dst, const __m512i& i_lo,
                          const __m512i& i_hi) {
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, i_lo, b));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, i_hi, b));
}

template <int G, int W, int KL, int VL>
void segment(const Rows& kr, const Rows& vr, int64_t n, int words_rt, int64_t d, float scale,
             const __m512i* q, float* m, float* l, float* acc /* [G][words][32] */) {
  constexpr bool KS = KL == kToken, VS = VL == kToken;
  const int words = W > 0 ? W : words_rt;
  __mmask32 dm[8];
  for (int w = 0; w < 8; ++w) dm[w] = dense_mask(d, w);
  alignas(64) float sbuf[kBlock][16 * G];   // per-lane partial scores of the block
  alignas(64) uint32_t pp[G][kBlock / 2];    // softmax weights as bf16 pairs
  int voff[VS ? kBlock : 1][8];              // sparse V: value offset of chunk w in row i
  const int64_t vrow_bytes = vr.stride * 2;
  __m512 lv[G];  // per-lane sums of the softmax weights (scaled with l on a new max)
  for (int g = 0; g < G; ++g) lv[g] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int nc = static_cast<int>(n - c0 < kBlock ? n - c0 : kBlock);
    // Scores (the transpose-tree reduction works on 16 tokens).
    for (int i = 0; i < nc; ++i) {
      // This token's V row (and bitmap) on its way while K is being read (see above).
      const char* vp = reinterpret_cast<const char*>(vr.vals + (c0 + i) * vr.stride);
      for (int64_t j = 0; j < vrow_bytes; j += 64) _mm_prefetch(vp + j, _MM_HINT_T1);
      if constexpr (VS)
        _mm_prefetch(reinterpret_cast<const char*>(vr.bits + (c0 + i) * words), _MM_HINT_T1);
      __m512 s[G];
      for (int g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      int off = 0;
      _Pragma("GCC unroll 8") for (int w = 0; w < words; ++w) {
        const __m512i kv = load_chunk<KS>(kr, c0 + i, w, words, dm[w], off);
        for (int g = 0; g < G; ++g)
          s[g] = _mm512_dpbf16_ps(s[g], (__m512bh)kv, (__m512bh)q[g * words + w]);
      }
      for (int g = 0; g < G; ++g) _mm512_store_ps(&sbuf[i][16 * g], s[g]);
    }
    for (int i = nc; i < kBlock; ++i)
      for (int g = 0; g < G; ++g) _mm512_store_ps(&sbuf[i][16 * g], _mm512_setzero_ps());
    const __mmask16 live = static_cast<__mmask16>((1u << nc) - 1u);
    // Online softmax, once per block. p goes to bf16 for the P·V product, as
    // FlashAttention does (l sums the same rounded weights). No horizontal reduction on
    // the common path: the block's max is only needed when a score exceeds the running
    // max (rare after the first blocks), and l is summed per lane until the call ends.
    // (A reduce-max and a reduce-add per head and block, each a chain of dependent
    // shuffles, took ~20% of the sparse kernel's time.)
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mask_mov_ps(
          _mm512_set1_ps(-INFINITY), live,
          _mm512_mul_ps(reduce16(&sbuf[0][0] + 16 * g, 16 * G), _mm512_set1_ps(scale)));
      softmax_step(sv, m[g], l[g], lv[g], acc + g * words * 32, words * 32, pp[g]);
    }
    // V: tokens in pairs. Each pair's chunks are interleaved (vpunpck{l,h}wd) so one
    // vdpbf16ps adds p_t v_t + p_u v_u for 16 dimensions.
    if constexpr (VS) {
      for (int i = 0; i < nc; ++i) {
        const uint32_t* bw = vr.bits + (c0 + i) * words;
        int o = 0;
        for (int w = 0; w < words; ++w) {
          voff[i][w] = o;
          o += _mm_popcnt_u32(bw[w]);
        }
      }
    }
    // V pass over the rows: WB chunks for GB query heads at a time, 2 * WB * GB <= 16
    // accumulators. Dense rows: whole rows (W <= 4) per pass, which keeps the V stream
    // sequential (a pass per 32-dimension chunk reads the rows in stripes: 1.2-1.5x
    // slower from DRAM); a group too large for that re-reads the rows, now in L1, once
    // per GB heads (the last pass takes the remainder). Sparse rows: one chunk for every
    // query head per pass, as a re-read would expand the chunk again (sparse V is bound
    // by compute, not by the stream).
    auto v_all = [&](auto wb) {
      constexpr int WB = decltype(wb)::value;
      constexpr int GB = VS ? (G < 8 ? G : 8) : (G < 8 / WB ? G : 8 / WB);
      constexpr int kRest = G % GB;
      int g0 = 0;
      for (; g0 + GB <= G; g0 += GB)
        v_pass<GB, WB, VS>(vr, c0, nc, words, dm, voff, pp, acc, g0);
      if constexpr (kRest > 0)
        v_pass<kRest, WB, VS>(vr, c0, nc, words, dm, voff, pp, acc, g0);
    };
    if constexpr (VL == kDense)
      v_all(Lay<(W > 0 && W <= 4 ? W : 1)>{});
    else
      v_all(Lay<1>{});
  }
  for (int g = 0; g < G; ++g) l[g] += _mm512_reduce_add_ps(lv[g]);
}

// ---- Masks shared by 16 tokens: the block layouts (attention.h)
//
// The 16 tokens of a block keep the same dimensions, so each block is a dense
// [16, keep] matrix over them, stored for the two products:
//   K transposed in kept-dimension pairs, [pair][token][2]: one vdpbf16ps per pair and
//     query head (q's pair broadcast from memory) adds to all 16 tokens' scores, which
//     come out as one vector per head: no per-token reduction tree;
//   V in token pairs, [token pair][kept dim][2]: one vdpbf16ps per 16 kept dimensions,
//     query head and token pair (the pair's softmax weights broadcast), into
//     accumulators over the kept dimensions in order: no unpack, no permutes.
// So the multiplies shrink with sparsity (at 50%: half the dense kernel's vdpbf16ps),
// plus per block: q compressed to the kept dimensions (vpcompressw), the softmax, and
// the V sums expanded back (vexpandps) and added to the dense accumulators.
//
// Zen 4 runs the memory forms of vexpandps / vpcompressw slowly, and the zero-masked
// register forms wait for the old destination (see expand_avx512.h): merge into a
// fresh zero, from a register the compiler cannot fold a load into.
inline __m512 expand_ps(__mmask16 m, __m512 v) {
  __m512 zero = _mm512_setzero_ps();
  asm("" : "+v"(zero), "+v"(v));
  return _mm512_mask_expand_ps(zero, m, v);
}

inline __m512i compress_epi16(uint32_t m, __m512i v) {
  __m512i zero = _mm512_setzero_si512();
  asm("" : "+v"(zero));
  return _mm512_mask_compress_epi16(zero, m, v);
}

// Both per-block steps go through small buffers written with stores that a load right
// after cannot take from the store queue (masked, or narrower than the load), which
// stalled the loop for ~20% of its time. So each is staged one block away from its use:
// q for block i+1 is compressed after block i's scores, and block i's V sums are
// expanded after block i+1's scores (before its softmax may rescale acc).
constexpr int kQBuf = 8 * 32 + 32;  // bf16 per query head: up to 8 chunks and a spare
constexpr int kFlat = 8 * 32 + 16;  // fp32 per query head: V sums and an expand's overrun

// q of G heads compressed to the kept dimensions of bitmap bw, into buf[G][kQBuf].
template <int G>
inline void stage_q(const uint32_t* bw, int words, const __m512i* q, uint16_t* buf) {
  for (int g = 0; g < G; ++g) {
    int o = 0;
    for (int w = 0; w < words; ++w) {
      const int cnt = _mm_popcnt_u32(bw[w]);
      _mm512_mask_storeu_epi16(buf + g * kQBuf + o, _bzhi_u32(~0u, cnt),
                               compress_epi16(bw[w], q[g * words + w]));
      o += cnt;
    }
  }
}

// flat (one query head's V sums, kept-dimension order) expanded by the bitmap bw and
// added to acc (dimension order).
inline void add_expanded(const float* flat, const uint32_t* bw, int words, float* acc) {
  int off = 0;
  for (int w = 0; w < 2 * words; ++w) {  // 16 dimensions at a time
    const __mmask16 m = static_cast<__mmask16>(bw[w / 2] >> (16 * (w % 2)));
    const __m512 e = expand_ps(m, _mm512_loadu_ps(flat + off));
    off += _mm_popcnt_u32(m);
    _mm512_store_ps(acc + 16 * w, _mm512_add_ps(_mm512_load_ps(acc + 16 * w), e));
  }
}

// One pass over a V block for query heads g0 .. g0+GB-1 and CB chunks of 16 kept
// dimensions from chunk c0 (2 * CB * GB <= 32 registers with the operands); the sums
// go to flat. vb: the block, kv: kept values per token, vc: chunks in all, the last
// read with last_mask.
template <int CB, int GB>
inline void blocked_v_pass(const uint16_t* vb, int kv, int c0, int vc, __mmask32 last_mask,
                           const uint32_t (*pp)[kBlock / 2], int g0, float (*flat)[kFlat]) {
  __m512 a[CB][GB];
  for (int c = 0; c < CB; ++c)
    for (int g = 0; g < GB; ++g) a[c][g] = _mm512_setzero_ps();
  for (int u = 0; u < kBlock / 2; ++u) {
    __m512bh pb[GB];
    for (int g = 0; g < GB; ++g)
      pb[g] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g0 + g][u]));
    for (int c = 0; c < CB; ++c) {
      const __mmask32 mk = c0 + c == vc - 1 ? last_mask : ~__mmask32{0};
      const __m512bh v =
          (__m512bh)_mm512_maskz_loadu_epi16(mk, vb + u * 2 * kv + 32 * (c0 + c));
      for (int g = 0; g < GB; ++g) a[c][g] = _mm512_dpbf16_ps(a[c][g], v, pb[g]);
    }
  }
  for (int c = 0; c < CB; ++c)
    for (int g = 0; g < GB; ++g) _mm512_store_ps(flat[g0 + g] + 16 * (c0 + c), a[c][g]);
}

template <int GB>
inline void blocked_v_chunks(int cb, const uint16_t* vb, int kv, int c0, int vc,
                             __mmask32 last_mask, const uint32_t (*pp)[kBlock / 2], int g0,
                             float (*flat)[kFlat]) {
  switch (cb) {
    case 4: return blocked_v_pass<4, GB>(vb, kv, c0, vc, last_mask, pp, g0, flat);
    case 3: return blocked_v_pass<3, GB>(vb, kv, c0, vc, last_mask, pp, g0, flat);
    case 2: return blocked_v_pass<2, GB>(vb, kv, c0, vc, last_mask, pp, g0, flat);
    default: return blocked_v_pass<1, GB>(vb, kv, c0, vc, last_mask, pp, g0, flat);
  }
}

// Lane sums of G vectors, each in every lane of its own vector (a butterfly, no scalar
// round trip), in place. Four at a time share the steps: 17 instructions for four
// vectors instead of 8 each. (Batching the key fill's sums of 16 blocks into one
// `reduce16` tree instead measured no faster.)
template <int G>
inline void sums_to_all(__m512* f) {
  int g = 0;
  for (; g + 3 <= G; g += 4) {
    const __m512 f3 = g + 3 < G ? f[g + 3] : _mm512_setzero_ps();
    // 128-bit lanes: [f0 f0 f1 f1] and [f2 f2 f3 f3] (halves added), then [f0 f1 f2 f3]
    const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(f[g], f[g + 1], 0x44),
                                   _mm512_shuffle_f32x4(f[g], f[g + 1], 0xEE));
    const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(f[g + 2], f3, 0x44),
                                   _mm512_shuffle_f32x4(f[g + 2], f3, 0xEE));
    __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4E));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0xB1));  // lane L: the sum of f[g + L]
    f[g] = _mm512_shuffle_f32x4(c, c, 0x00);
    f[g + 1] = _mm512_shuffle_f32x4(c, c, 0x55);
    f[g + 2] = _mm512_shuffle_f32x4(c, c, 0xAA);
    if (g + 3 < G) f[g + 3] = _mm512_shuffle_f32x4(c, c, 0xFF);
  }
  for (; g < G; ++g) {
    __m512 x = f[g];
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // 256-bit halves swapped
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // 128-bit lanes swapped
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));
    f[g] = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));
  }
}

// Shared-mask compressed tokens: nblk whole blocks; same state and contract as
// `segment` (acc in the kernel's lane order on entry and exit). kfill: the blocks' key
// fill rows ([nblk][32 words] bf16, see attention.h) or nullptr: the pruned key entries
// of a block all read as its fill, which adds q·fill to each of its 16 scores.
template <int G>
void blocked_segment(const Rows& kr, const Rows& vr, int64_t nblk, int words, float scale,
                     const __m512i* q, const uint16_t* kfill, float* m, float* l,
                     float* acc /* [G][words][32] */) {
  const int kk = static_cast<int>(kr.stride), kv = static_cast<int>(vr.stride);
  const int kp = kk / 2;          // K: whole kept-dimension pairs (an odd last one alone)
  const int vc = (kv + 15) / 16;  // V: chunks of 16 kept dimensions
  const int vrest = 2 * (kv - 16 * (vc - 1));  // bf16 in the last chunk's rows
  const __mmask32 v_last =
      vrest >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << vrest) - 1u);
  alignas(64) uint16_t qbuf[2][G * kQBuf];  // q on the kept dims: this block's, the next's
  alignas(64) float flat[G][kFlat];         // a block's V sums per head, kept-dim order
  alignas(64) uint32_t pp[G][kBlock / 2];   // softmax weights as bf16 pairs
  const uint32_t* pending = nullptr;        // V bitmap of the block whose flat awaits adding
  const __m512i dims_lo = to_dims_lo(), dims_hi = to_dims_hi();
  for (int j = 0; j < G * words; ++j) permute_chunk(acc + 32 * j, acc + 32 * j, dims_lo, dims_hi);
  stage_q<G>(kr.bits, words, q, qbuf[0]);
  __m512 lv[G];  // per-lane sums of the softmax weights (as in `segment`)
  for (int g = 0; g < G; ++g) lv[g] = _mm512_setzero_ps();
  const __m512 vscale = _mm512_set1_ps(scale);
  // Small groups: two accumulator sets per head, so the vdpbf16ps chains overlap.
  constexpr int NA = G >= 4 ? 1 : 2;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const uint16_t* kb = kr.vals + blk * kBlock * kk;
    const uint16_t* vb = vr.vals + blk * kBlock * kv;
    const uint16_t* qb = qbuf[blk & 1];
    auto q_pair = [&](int g, int p) {  // bf16 pair p of head g's compressed q, broadcast
      int32_t x;
      __builtin_memcpy(&x, qb + g * kQBuf + 2 * p, 4);
      return (__m512bh)_mm512_set1_epi32(x);
    };
    __m512 s[NA][G];
    for (int a = 0; a < NA; ++a)
      for (int g = 0; g < G; ++g) s[a][g] = _mm512_setzero_ps();
    int p = 0;
    for (; p + NA <= kp; p += NA)
      for (int a = 0; a < NA; ++a) {
        const __m512bh kz = (__m512bh)_mm512_loadu_si512(kb + 32 * (p + a));
        for (int g = 0; g < G; ++g) s[a][g] = _mm512_dpbf16_ps(s[a][g], kz, q_pair(g, p + a));
      }
    for (; p < kp; ++p) {
      const __m512bh kz = (__m512bh)_mm512_loadu_si512(kb + 32 * p);
      for (int g = 0; g < G; ++g) s[0][g] = _mm512_dpbf16_ps(s[0][g], kz, q_pair(g, p));
    }
    if (kk & 1) {  // odd keep: the last kept dimension, 16 tokens' values in a row
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + 32 * kp));
      const __m512 kl = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      for (int g = 0; g < G; ++g)
        s[0][g] = _mm512_fmadd_ps(kl, _mm512_set1_ps(bf16_to_float(qb[g * kQBuf + kk - 1])),
                                  s[0][g]);
    }
    if (kfill) {  // the pruned entries' share of each of the block's scores: q·fill
      const uint16_t* fb = kfill + blk * words * 32;
      __m512 f[G];
      for (int g = 0; g < G; ++g) f[g] = _mm512_setzero_ps();
      for (int w = 0; w < words; ++w) {
        const __m512bh fw = (__m512bh)_mm512_loadu_si512(fb + 32 * w);
        for (int g = 0; g < G; ++g) f[g] = _mm512_dpbf16_ps(f[g], fw, (__m512bh)q[g * words + w]);
      }
      sums_to_all<G>(f);
      for (int g = 0; g < G; ++g) s[0][g] = _mm512_add_ps(s[0][g], f[g]);
    }
    if (blk + 1 < nblk) stage_q<G>(kr.bits + (blk + 1) * words, words, q, qbuf[(blk + 1) & 1]);
    if (pending)
      for (int g = 0; g < G; ++g) add_expanded(flat[g], pending, words, acc + g * words * 32);
    // Online softmax, as in `segment` (all 16 tokens live: blocks are whole).
    for (int g = 0; g < G; ++g) {
      __m512 sv = s[0][g];
      if constexpr (NA > 1) sv = _mm512_add_ps(sv, s[1][g]);
      softmax_step(_mm512_mul_ps(sv, vscale), m[g], l[g], lv[g], acc + g * words * 32,
                   words * 32, pp[g]);
    }
    // V: up to 4 chunks for up to 4 heads per pass (a larger group or more kept
    // dimensions re-read the block, now in L1).
    constexpr int GB = G < 4 ? G : 4;
    for (int c0 = 0; c0 < vc; c0 += 4) {
      const int cb = vc - c0 < 4 ? vc - c0 : 4;
      int g0 = 0;
      for (; g0 + GB <= G; g0 += GB) blocked_v_chunks<GB>(cb, vb, kv, c0, vc, v_last, pp, g0, flat);
      if constexpr (G % GB > 0)
        blocked_v_chunks<G % GB>(cb, vb, kv, c0, vc, v_last, pp, g0, flat);
    }
    pending = vr.bits + blk * words;
  }
  if (pending)
    for (int g = 0; g < G; ++g) add_expanded(flat[g], pending, words, acc + g * words * 32);
  const __m512i lo = to_lanes_lo(), hi = to_lanes_hi();
  for (int j = 0; j < G * words; ++j) permute_chunk(acc + 32 * j, acc + 32 * j, lo, hi);
  for (int g = 0; g < G; ++g) l[g] += _mm512_reduce_add_ps(lv[g]);
}

template <int G>
void attend(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t t0, int64_t t1,
            float* m, float* l, float* acc_out) {
  const int words = static_cast<int>(a.words);
  const int64_t dp = a.words * 32, group = a.hq / a.hkv;
  __m512i q[G * 8];  // bf16 query chunks; words <= 8 (D <= 256, checked by the glue)
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < words; ++w)
      q[g * words + w] = _mm512_loadu_si512(a.q + (b * a.hq + h * group + g0 + g) * dp + 32 * w);
  // Accumulators in the kernel's lane order (see permute_chunk).
  const __m512i lanes_lo = to_lanes_lo(), lanes_hi = to_lanes_hi();
  const __m512i dims_lo = to_dims_lo(), dims_hi = to_dims_hi();
  alignas(64) float acc[G * 256];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < words; ++w)
      permute_chunk(acc_out + g * dp + 32 * w, acc + (g * words + w) * 32, lanes_lo, lanes_hi);
  const int64_t bh = b * a.hkv + h;
  const int shift = a.mask_shift;
  auto comp_rows = [&](const KVSide& s) {
    return Rows{s.vals + bh * s.cap * s.keep, s.keep,
                s.bits ? s.bits + bh * (s.cap >> shift) * a.words : nullptr};
  };
  const int64_t c0 = t0 < a.n_comp ? t0 : a.n_comp, c1 = t1 < a.n_comp ? t1 : a.n_comp;
  auto run = [&](auto kl, auto vl, const Rows& kr, const Rows& vr, int64_t n) {
    constexpr int KL = decltype(kl)::value, VL = decltype(vl)::value;
    if (words == 4)
      segment<G, 4, KL, VL>(kr, vr, n, words, a.d, a.scale_log2e, q, m, l, acc);
    else if (words == 2)
      segment<G, 2, KL, VL>(kr, vr, n, words, a.d, a.scale_log2e, q, m, l, acc);
    else
      segment<G, 0, KL, VL>(kr, vr, n, words, a.d, a.scale_log2e, q, m, l, acc);
  };
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
      blocked_segment<G>(kr, vr, n / kBlock, words, a.scale_log2e, q, kfill, m, l, acc);
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
    const Rows kr{a.k.win + b * a.k.win_sb + h * a.k.win_sh + w0 * a.k.win_st, a.k.win_st,
                  nullptr};
    const Rows vr{a.v.win + b * a.v.win_sb + h * a.v.win_sh + w0 * a.v.win_st, a.v.win_st,
                  nullptr};
    run(Lay<kDense>{}, Lay<kDense>{}, kr, vr, w1 - w0);
  }
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < words; ++w)
      permute_chunk(acc + (g * words + w) * 32, acc_out + g * dp + 32 * w, dims_lo, dims_hi);
}

}  // namespace

void attention_avx512(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng,
                      int64_t t0, int64_t t1, float* m, float* l, float* acc) {
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
