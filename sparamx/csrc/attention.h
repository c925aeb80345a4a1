// Decode attention (one query token per sequence) over a sparse KV cache: the argument
// block shared by the per-ISA kernels and the torch glue (attention_ops.cpp).
//
// Cache layout, per batch row b and KV head h (see sparamx/kv.py):
//   compressed tokens 0 .. n_comp-1:
//     sparse: bits[b, h, t >> S, 0..W-1]  uint32, W = ceil(D / 32); bit j of word w set
//                                   iff dimension 32w + j of token t is kept; one mask
//                                   per token (S = mask_shift = 0) or per 16 tokens (S = 4)
//             vals[b, h, t, 0..keep-1] the kept bf16; every token keeps exactly `keep`
//                                   entries, so token t starts at t * keep (no offsets
//                                   table, and no address waits on the popcount of the
//                                   previous token). A mask per token: in dimension
//                                   order. Per 16 tokens: each block's 16 * keep values
//                                   reordered for the products (kernel comments):
//                                   K [pair p < keep/2][token][2] = kept values 2p, 2p+1,
//                                   then for odd keep [token] = the last kept value;
//                                   V [token pair u][kept value j][2] = tokens 2u, 2u+1.
//                                   Both sides have bitmaps (keep = D when not pruned).
//             fill[b, h, t >> 4, 0..Dp-1] (K, shared masks; optional) bf16: what the
//                                   block's pruned entries read as (their mean over the
//                                   block's tokens), zero at kept dimensions and beyond D
//     dense:  vals[b, h, t, 0..D-1], bits = nullptr (a mask per token only)
//   dense window tokens n_comp .. n_comp+n_win-1: win[b, h, t, 0..D-1], any strides
//   with unit stride along D.
// K and V each have their own layout (their sparsities may differ).
//
// The kernels compute, for the G query heads of one KV head and a token range, the
// flash-decoding partial state: running max m (log2 domain, scores pre-multiplied by
// scale * log2 e), running sum l of 2^(s - m), and acc = sum 2^(s - m) v, all fp32.
// Ranges of the same (b, h) are merged by the glue, so a context splits across threads.
#pragma once
#include <cstdint>

namespace sparamx {

constexpr int kAttnMaxGroup = 8;  // query heads per kernel call (larger groups are split)

struct KVSide {          // one of K or V
  const uint16_t* vals;  // compressed tokens, [B, H, cap, keep] bf16 bits
  const uint32_t* bits;  // [B, H, cap >> mask_shift, W]; nullptr: dense (keep == D)
  const uint16_t* fill;  // [B, H, cap >> 4, Dp] bf16 (shared masks only) or nullptr: 0
  int64_t keep;          // values per compressed token
  int64_t cap;           // token capacity of the compressed arrays (>= n_comp)
  const uint16_t* win;   // dense window, bf16 bits
  int64_t win_sb, win_sh, win_st;  // window strides (elements) for b, h, t
};

struct AttnArgs {
  const uint16_t* q;  // bf16 [B, Hq, Dp], zero-padded from D to Dp = 32 W
  int64_t batch, hq, hkv, d, words;
  float scale_log2e;  // softmax scale times log2(e): the kernels work with exp2
  int64_t n_comp, n_win;
  int mask_shift;  // log2(tokens per mask): 0 or 4 (then n_comp, cap and token ranges
                   // into the compressed tokens are multiples of 16)
  KVSide k, v;
};

// Partial attention for batch row b, KV head h, its query heads g0 .. g0+ng-1 (ng <=
// kAttnMaxGroup, counted within the group), over tokens [t0, t1) of the concatenation
// compressed ++ window. Updates m[ng], l[ng], acc[ng][Dp] in place (start: -inf, 0, 0).
void attention_portable(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng,
                        int64_t t0, int64_t t1, float* m, float* l, float* acc);
void attention_avx2(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng,
                    int64_t t0, int64_t t1, float* m, float* l, float* acc);
void attention_avx512(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng,
                      int64_t t0, int64_t t1, float* m, float* l, float* acc);

}  // namespace sparamx
