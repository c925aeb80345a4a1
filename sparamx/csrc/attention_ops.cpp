// torch glue for decode attention over the sparse KV cache: argument checks, kernel
// choice, flash-decoding split of (batch, KV head, query-head group, token range) across
// threads, and the merge of the partial softmax states.
//
// Op (its fake kernel is registered from sparamx/kv.py):
//   sparamx::kv_decode_attention(q, k_vals, k_bits?, v_vals, v_bits?, n_comp, k_win, v_win,
//                                scale, impl?, mask_tokens=1, k_fill?) -> Tensor
//                                (impl: a kernel name; see ops.cpp on why it is not
//                                called `kernel`)
//   q [B, Hq, D] bf16 or fp32 (one query token per sequence; result in q's dtype);
//   k_vals / v_vals [B, Hkv, cap, keep] bf16 with cap >= n_comp (keep = D when dense);
//   k_bits / v_bits [B, Hkv, cap / mask_tokens, ceil(D/32)] int32 or None (dense
//   compressed tokens); mask_tokens 1 (a mask per token) or 16 (per 16 tokens: both
//   bitmaps given, values in the block layouts of attention.h);
//   k_fill [B, Hkv, cap / 16, 32 ceil(D/32)] bf16 or None: with mask_tokens 16, what each
//   block's pruned key entries read as (zero at kept dimensions; kv.group_fill);
//   k_win / v_win [B, Hkv, n_win, D] bf16, unit stride along D (the dense recent window);
//   lengths [B] int64 or None: row b attends to its first lengths[b] tokens only (1 ..
//   n_comp + n_win; batched decode of sequences of unequal lengths, sparamx/batch.py).
// Hq must be a multiple of Hkv (GQA); each K/V byte is read once per KV head.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "attention.h"
#include "cpu_features.h"
#include "paths.h"

namespace sparamx {
namespace {

using AttnFn = void (*)(const AttnArgs&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        float*, float*, float*);

constexpr int64_t kMaxHeadDim = 256;  // kernels keep per-token tables of <= 8 words
// Smallest token range per work item: below this the per-item set-up (loading q,
// reordering accumulators, the merge) stops being small next to the streaming.
constexpr int64_t kMinChunkTokens = 256;

AttnFn attention_kernel(const c10::optional<c10::string_view>& name) {
  std::string want;
  if (name.has_value()) {
    want = std::string(*name);
  } else if (const char* env = std::getenv("SPARAMX_KERNEL"); env && *env) {
    want = env;
  }
  const auto& f = cpu_features();
  // The attention kernel has no AMX version: decode attention is a matrix-vector product
  // per KV head, bound by memory, with too few query rows (G <= 8) to fill a tile. So
  // auto (and amx): AVX-512-BF16, else AVX2+FMA, else portable.
  if (want.empty() || want == "auto" || want == "amx") {
    if (f.can_avx512()) return attention_avx512;
    return f.can_avx2() ? attention_avx2 : attention_portable;
  }
  if (want == "portable" || want == "amx_emulated") return attention_portable;
  if (want == "avx512") {
    TORCH_CHECK(f.can_avx512(),
                "sparamx: kernel 'avx512' needs AVX-512 F/BW/VL/DQ/BF16/VBMI2, which this CPU "
                "(or OS) does not provide; use kernel 'avx2' or 'portable'");
    return attention_avx512;
  }
  if (want == "avx2") {
    TORCH_CHECK(f.can_avx2(),
                "sparamx: kernel 'avx2' needs AVX2, FMA, F16C, BMI2 and POPCNT (and OS support "
                "for ymm state), which this CPU does not provide; use kernel 'portable'");
    return attention_avx2;
  }
  TORCH_CHECK(false, "sparamx: unknown attention kernel '", want,
              "'; allowed: auto, amx, avx512, avx2, portable, amx_emulated");
}

}  // namespace

const char* attention_kernel_name() {
  const AttnFn fn = attention_kernel(c10::nullopt);
  if (fn == attention_avx512) return "avx512";
  if (fn == attention_avx2) return "avx2";
  return "portable";
}

namespace {

void check_side(const char* name, const at::Tensor& vals, const c10::optional<at::Tensor>& bits,
                const at::Tensor& win, int64_t B, int64_t H, int64_t D, int64_t n_comp,
                int64_t mask_tokens) {
  TORCH_CHECK(vals.device().is_cpu() && vals.scalar_type() == at::kBFloat16 &&
                  vals.dim() == 4 && vals.is_contiguous(),
              "sparamx: ", name, "_vals must be a contiguous 4-D bfloat16 CPU tensor [B, Hkv, "
              "cap, keep], got ", vals.scalar_type(), " ", vals.sizes());
  TORCH_CHECK(vals.size(0) == B && vals.size(1) == H && vals.size(2) >= n_comp,
              "sparamx: ", name, "_vals has shape ", vals.sizes(), "; expected [", B, ", ", H,
              ", >= n_comp=", n_comp, ", keep]");
  const int64_t words = (D + 31) / 32;
  if (bits.has_value()) {
    TORCH_CHECK(vals.size(2) % mask_tokens == 0 && n_comp % mask_tokens == 0, "sparamx: ",
                name, "_vals capacity (", vals.size(2), ") and n_comp (", n_comp,
                ") must be multiples of mask_tokens (", mask_tokens, ")");
    TORCH_CHECK(bits->scalar_type() == at::kInt && bits->is_contiguous() && bits->dim() == 4 &&
                    bits->size(0) == B && bits->size(1) == H &&
                    bits->size(2) == vals.size(2) / mask_tokens && bits->size(3) == words,
                "sparamx: ", name, "_bits must be a contiguous int32 tensor [", B, ", ", H, ", ",
                vals.size(2) / mask_tokens, ", ", words, "] (one mask per ", mask_tokens,
                " tokens), got ", bits->scalar_type(), " ", bits->sizes());
    TORCH_CHECK(vals.size(3) >= 1 && vals.size(3) <= D, "sparamx: ", name,
                "_vals keeps ", vals.size(3), " values per token; allowed 1..", D);
  } else {
    TORCH_CHECK(vals.size(3) == D, "sparamx: ", name, "_vals without a bitmap must be dense (",
                D, " values per token), got ", vals.size(3));
  }
  TORCH_CHECK(win.device().is_cpu() && win.scalar_type() == at::kBFloat16 && win.dim() == 4 &&
                  win.size(0) == B && win.size(1) == H && win.size(3) == D &&
                  (win.stride(3) == 1 || D == 1),
              "sparamx: ", name, "_win must be a bfloat16 CPU tensor [", B, ", ", H,
              ", n_win, ", D, "] with unit stride along head_dim, got ", win.scalar_type(), " ",
              win.sizes(), " strides ", win.strides());
}

at::Tensor kv_decode_attention(const at::Tensor& q, const at::Tensor& k_vals,
                               const c10::optional<at::Tensor>& k_bits, const at::Tensor& v_vals,
                               const c10::optional<at::Tensor>& v_bits, int64_t n_comp,
                               const at::Tensor& k_win, const at::Tensor& v_win, double scale,
                               c10::optional<c10::string_view> kernel, int64_t mask_tokens,
                               const c10::optional<at::Tensor>& k_fill,
                               const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK(q.device().is_cpu() && (q.scalar_type() == at::kBFloat16 ||
                                      q.scalar_type() == at::kFloat) && q.dim() == 3,
              "sparamx: q must be a bfloat16 or float32 CPU tensor [B, Hq, D], got ",
              q.scalar_type(), " ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "sparamx: head_dim ", D, " not in 1..", kMaxHeadDim);
  TORCH_CHECK(k_vals.dim() == 4, "sparamx: k_vals must be 4-D [B, Hkv, cap, keep], got ",
              k_vals.sizes());
  const int64_t H = k_vals.size(1);
  TORCH_CHECK(H >= 1 && Hq % H == 0, "sparamx: query heads (", Hq,
              ") must be a multiple of KV heads (", H, ")");
  TORCH_CHECK(n_comp >= 0, "sparamx: n_comp must be >= 0, got ", n_comp);
  TORCH_CHECK(mask_tokens == 1 || mask_tokens == 16, "sparamx: mask_tokens ", mask_tokens,
              " is not supported; allowed: 1 or 16");
  TORCH_CHECK(mask_tokens == 1 || n_comp == 0 || (k_bits.has_value() && v_bits.has_value()),
              "sparamx: with mask_tokens 16 both k_bits and v_bits must be given (a side kept "
              "whole has full masks; see kv.prune_tokens)");
  check_side("k", k_vals, k_bits, k_win, B, H, D, n_comp, mask_tokens);
  check_side("v", v_vals, v_bits, v_win, B, H, D, n_comp, mask_tokens);
  if (k_fill.has_value()) {
    TORCH_CHECK(mask_tokens == 16 && k_bits.has_value(),
                "sparamx: k_fill needs masks shared by 16 tokens (mask_tokens 16 and k_bits)");
    TORCH_CHECK(k_fill->device().is_cpu() && k_fill->scalar_type() == at::kBFloat16 &&
                    k_fill->is_contiguous() && k_fill->dim() == 4 && k_fill->size(0) == B &&
                    k_fill->size(1) == H && k_fill->size(2) == k_vals.size(2) / 16 &&
                    k_fill->size(3) == 32 * ((D + 31) / 32),
                "sparamx: k_fill must be a contiguous bfloat16 CPU tensor [", B, ", ", H, ", ",
                k_vals.size(2) / 16, ", ", 32 * ((D + 31) / 32), "] (one row per 16 tokens, "
                "head_dim padded to whole 32s), got ", k_fill->scalar_type(), " ",
                k_fill->sizes());
  }
  TORCH_CHECK(k_win.size(2) == v_win.size(2), "sparamx: k_win has ", k_win.size(2),
              " tokens but v_win has ", v_win.size(2));
  const int64_t n_win = k_win.size(2), n = n_comp + n_win;
  TORCH_CHECK(n >= 1, "sparamx: attention over an empty cache (n_comp + n_win = 0)");
  const AttnFn fn = attention_kernel(kernel);
  // Tokens each row attends to: n, or the row's own length (the rest is another
  // sequence's unfilled tail).
  std::vector<int64_t> row_tokens(static_cast<size_t>(B), n);
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                    lengths->size(0) == B && lengths->device().is_cpu(),
                "sparamx: lengths must be an int64 CPU tensor [", B, "], got ",
                lengths->scalar_type(), " ", lengths->sizes());
    const at::Tensor lc = lengths->contiguous();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lc.data_ptr<int64_t>()[b];
      TORCH_CHECK(len >= 1 && len <= n, "sparamx: lengths[", b, "] = ", len,
                  " is not in 1..", n, " (the cached tokens)");
      row_tokens[static_cast<size_t>(b)] = len;
    }
  }

  const int64_t words = (D + 31) / 32, dp = 32 * words;
  // The kernels read q as bf16 rows of Dp; copy only when q is not that already.
  at::Tensor qb;
  if (q.scalar_type() == at::kBFloat16 && D == dp && q.is_contiguous()) {
    qb = q;
  } else {
    qb = at::zeros({B, Hq, dp}, q.options().dtype(at::kBFloat16));
    qb.narrow(2, 0, D).copy_(q);
  }
  AttnArgs a;
  a.q = reinterpret_cast<const uint16_t*>(qb.data_ptr<at::BFloat16>());
  a.batch = B;
  a.hq = Hq;
  a.hkv = H;
  a.d = D;
  a.words = words;
  a.scale_log2e = static_cast<float>(scale * 1.4426950408889634);
  a.n_comp = n_comp;
  a.n_win = n_win;
  a.mask_shift = mask_tokens == 16 ? 4 : 0;
  auto side = [&](const at::Tensor& vals, const c10::optional<at::Tensor>& bits,
                  const at::Tensor& win) {
    KVSide s;
    s.vals = reinterpret_cast<const uint16_t*>(vals.data_ptr<at::BFloat16>());
    s.bits = bits.has_value() ? reinterpret_cast<const uint32_t*>(bits->data_ptr<int32_t>())
                              : nullptr;
    s.fill = nullptr;
    s.keep = vals.size(3);
    s.cap = vals.size(2);
    s.win = reinterpret_cast<const uint16_t*>(win.data_ptr<at::BFloat16>());
    s.win_sb = win.stride(0);
    s.win_sh = win.stride(1);
    s.win_st = win.stride(2);
    return s;
  };
  a.k = side(k_vals, k_bits, k_win);
  a.v = side(v_vals, v_bits, v_win);
  if (k_fill.has_value())
    a.k.fill = reinterpret_cast<const uint16_t*>(k_fill->data_ptr<at::BFloat16>());

  // Work items: (b, h, query-head chunk, token chunk). Token chunks let a single
  // sequence use every thread (flash decoding); they are merged below in token order.
  const int64_t group = Hq / H;
  const int64_t gchunks = (group + kAttnMaxGroup - 1) / kAttnMaxGroup;
  const int64_t gsize = (group + gchunks - 1) / gchunks;
  const int64_t base_items = B * H * gchunks;
  const int64_t want = 4 * at::get_num_threads();
  int64_t tchunks = std::max<int64_t>(1, (want + base_items - 1) / base_items);
  tchunks = std::min<int64_t>(tchunks, std::max<int64_t>(1, n / kMinChunkTokens));
  int64_t chunk = (n + tchunks - 1) / tchunks;
  chunk = (chunk + 15) / 16 * 16;  // whole sub-blocks of 16 tokens
  tchunks = (n + chunk - 1) / chunk;
  const int64_t items = base_items * tchunks;
  const int64_t state = gsize * (dp + 2);  // per item: m[gsize], l[gsize], acc[gsize][dp]
  std::vector<float> part(static_cast<size_t>(items * state));
  // At least ~128 KiB of cache bytes per task: small calls (short contexts, small
  // models) run on the calling thread instead of waking (and waiting for) the pool.
  const int64_t item_bytes =
      std::max<int64_t>(1, chunk * (a.k.keep + a.v.keep) * 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t{128} << 10) / item_bytes);
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t tc = it % tchunks, rest = it / tchunks;
      const int64_t gc = rest % gchunks, bh = rest / gchunks;
      const int64_t g0 = gc * gsize, ng = std::min(gsize, group - g0);
      float* m = part.data() + it * state;
      float* l = m + gsize;
      float* acc = l + gsize;
      std::fill(m, m + gsize, -std::numeric_limits<float>::infinity());
      std::fill(l, l + gsize + gsize * dp, 0.f);
      const int64_t t0 = tc * chunk;
      const int64_t t1 = std::min(row_tokens[static_cast<size_t>(bh / H)], (tc + 1) * chunk);
      if (ng > 0 && t0 < t1) fn(a, bh / H, bh % H, g0, ng, t0, t1, m, l, acc);
    }
  });
  // Merge token chunks: out = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c.
  // Merged in fp32 rows, written in q's dtype.
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  const bool bf16_out = q.scalar_type() == at::kBFloat16;
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t gc = 0; gc < gchunks; ++gc)
      for (int64_t g = 0; g < std::min(gsize, group - gc * gsize); ++g) {
        const int64_t first = (bh * gchunks + gc) * tchunks;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t tc = 0; tc < tchunks; ++tc) mx = std::max(mx, part[(first + tc) * state + g]);
        float* dst = row.data();
        std::fill(dst, dst + D, 0.f);
        float lsum = 0.f;
        for (int64_t tc = 0; tc < tchunks; ++tc) {
          const float* m = part.data() + (first + tc) * state;
          if (m[g] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp2(m[g] - mx);
          lsum += w * m[gsize + g];
          const float* acc = m + 2 * gsize + g * dp;
          for (int64_t j = 0; j < D; ++j) dst[j] += w * acc[j];
        }
        const float inv = 1.f / lsum;
        const int64_t o = ((bh / H) * Hq + (bh % H) * group + gc * gsize + g) * D;
        if (bf16_out) {
          at::BFloat16* ob = out.data_ptr<at::BFloat16>() + o;
          for (int64_t j = 0; j < D; ++j) ob[j] = static_cast<at::BFloat16>(dst[j] * inv);
        } else {
          float* of = out.data_ptr<float>() + o;
          for (int64_t j = 0; j < D; ++j) of[j] = dst[j] * inv;
        }
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparamx, m) {
  m.def("kv_decode_attention(Tensor q, Tensor k_vals, Tensor? k_bits, Tensor v_vals, "
        "Tensor? v_bits, SymInt n_comp, Tensor k_win, Tensor v_win, float scale, "
        "str? impl=None, int mask_tokens=1, Tensor? k_fill=None, Tensor? lengths=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("kv_decode_attention", &kv_decode_attention); }

}  // namespace sparamx
