// Portable decode attention over the sparse KV cache (any CPU): the fallback where
// neither AVX-512-BF16 nor AVX2+FMA is available, and a second implementation the
// x86 kernels are tested against. Same math: bf16 q and K/V, fp32 products and sums,
// online softmax in the log2 domain.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "attention.h"
#include "kernels.h"

namespace sparamx {
namespace {

// Position of token t's i-th kept value in a 16-token block of the shared-mask layouts
// (attention.h): K transposed in dimension pairs, V in token pairs.
int64_t block_index(bool is_k, int64_t keep, int64_t t, int64_t i) {
  if (!is_k) return (t / 2) * 2 * keep + 2 * i + (t & 1);
  const int64_t pairs = keep / 2;
  return i < 2 * pairs ? 32 * (i / 2) + 2 * t + (i & 1) : 32 * pairs + t;
}

// Token t of one side expanded to D floats (dense positions; pruned entries are 0).
void load_token(const AttnArgs& a, const KVSide& s, bool is_k, int64_t b, int64_t h, int64_t t,
                float* out) {
  const int64_t D = a.d;
  if (t < a.n_comp) {
    const int64_t row = (b * a.hkv + h) * s.cap + t;
    const uint16_t* v = s.vals + row * s.keep;
    if (!s.bits) {
      for (int64_t j = 0; j < D; ++j) out[j] = bf16_to_float(v[j]);
      return;
    }
    const uint32_t* bits =
        s.bits + ((b * a.hkv + h) * (s.cap >> a.mask_shift) + (t >> a.mask_shift)) * a.words;
    const int64_t tb = t & 15;  // shared masks: token t within its block
    const uint16_t* blk = v - tb * s.keep;
    const uint16_t* fill =
        s.fill ? s.fill + ((b * a.hkv + h) * (s.cap >> 4) + (t >> 4)) * a.words * 32 : nullptr;
    int64_t k = 0;
    for (int64_t j = 0; j < D; ++j) {
      float x = fill ? bf16_to_float(fill[j]) : 0.f;
      if (bits[j >> 5] >> (j & 31) & 1u) {
        x = bf16_to_float(a.mask_shift ? blk[block_index(is_k, s.keep, tb, k)] : v[k]);
        ++k;
      }
      out[j] = x;
    }
    return;
  }
  const uint16_t* w = s.win + b * s.win_sb + h * s.win_sh + (t - a.n_comp) * s.win_st;
  for (int64_t j = 0; j < D; ++j) out[j] = bf16_to_float(w[j]);
}

}  // namespace

void attention_portable(const AttnArgs& a, int64_t b, int64_t h, int64_t g0, int64_t ng,
                        int64_t t0, int64_t t1, float* m, float* l, float* acc) {
  const int64_t D = a.d, Dp = a.words * 32;
  const int64_t group = a.hq / a.hkv;
  float kt[256], vt[256];  // D <= 256 is checked by the glue
  float q[kAttnMaxGroup][256];
  for (int64_t g = 0; g < ng; ++g) {
    const uint16_t* qg = a.q + (b * a.hq + h * group + g0 + g) * Dp;
    for (int64_t j = 0; j < D; ++j) q[g][j] = bf16_to_float(qg[j]);
  }
  for (int64_t t = t0; t < t1; ++t) {
    load_token(a, a.k, true, b, h, t, kt);
    load_token(a, a.v, false, b, h, t, vt);
    for (int64_t g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < D; ++j) s += q[g][j] * kt[j];
      s *= a.scale_log2e;
      const float m_new = s > m[g] ? s : m[g];
      const float corr = std::exp2(m[g] - m_new);  // 0 when m was -inf
      const float p = std::exp2(s - m_new);
      l[g] = l[g] * corr + p;
      m[g] = m_new;
      float* ag = acc + g * Dp;
      for (int64_t j = 0; j < D; ++j) ag[j] = ag[j] * corr + p * vt[j];
    }
  }
}

#if !(defined(__x86_64__) || defined(_M_X64))
// Non-x86 builds: the x86 kernels are not compiled; the glue never selects them there.
void attention_avx2(const AttnArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    float*, float*, float*) {
  std::abort();
}
void attention_avx512(const AttnArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                      float*, float*, float*) {
  std::abort();
}
#endif

}  // namespace sparamx
