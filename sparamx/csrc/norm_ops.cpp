// sparamx::rms_norm: the RMSNorm of transformers' Llama-family and Gemma modules with
// bitwise the eager module's result. The lean decode loop (sparamx/generate.py) calls it
// from the compiled decode step instead of calling the Python module back (measured on
// SmolLM2-135M: 61 norms per token, ~74 us each through Python).
//
//   offset_weight = false (Llama, Qwen2, Mistral, ...):
//     h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); weight * h.to(x.dtype)
//   offset_weight = true (Gemma):
//     h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); (h * (1 + weight.float())).to(x.dtype)
//
// bf16 (the decode loop's case) takes a fused path: ATen's own mean, the elementwise
// steps by hand (see rms_norm_fused); anything else runs the eager forward's ATen calls.
// Which form a given module computes is checked bitwise on sample inputs before use;
// modules matching neither stay on their own forward.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_features.h"
#include "kernels.h"

namespace sparamx {
namespace {

// fp32 -> bf16 bits as c10::BFloat16 rounds: to nearest even, a NaN becomes 0x7FC0
// (kernels.h's float_to_bf16 keeps a NaN's payload instead, so it cannot serve here);
// widening is kernels.h's bf16_to_float. Branch-free, so the loops below vectorise.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t{0x7fc0} : rounded;
}

// The elementwise halves of the fused norm on raw bf16 bits. Each runs as compiled for
// the build's baseline or, on CPUs with it, for AVX2 (the same source; always_inline
// bodies in two wrappers with their own target). Elementwise IEEE operations round the
// same in any vector width, so both give bitwise the same results.
__attribute__((always_inline)) inline void squares_body(const uint16_t* x, float* sq,
                                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float h = bf16_to_float(x[i]);
    sq[i] = h * h;
  }
}

__attribute__((always_inline)) inline void scale_body(const uint16_t* x, const uint16_t* w,
                                                      const float* variance, float eps,
                                                      int64_t rows, int64_t d,
                                                      bool offset_weight, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / std::sqrt(variance[r] + eps);
    const uint16_t* xr = x + r * d;
    uint16_t* o = out + r * d;
    if (offset_weight) {
      for (int64_t j = 0; j < d; ++j)
        o[j] = float_to_bf16_bits(bf16_to_float(xr[j]) * inv *
                                  (bf16_to_float(w[j]) + 1.0f));
    } else {
      for (int64_t j = 0; j < d; ++j)
        o[j] = float_to_bf16_bits(
            bf16_to_float(w[j]) *
            bf16_to_float(float_to_bf16_bits(bf16_to_float(xr[j]) * inv)));
    }
  }
}

void squares_generic(const uint16_t* x, float* sq, int64_t n) { squares_body(x, sq, n); }
void scale_generic(const uint16_t* x, const uint16_t* w, const float* v, float eps,
                   int64_t rows, int64_t d, bool off, uint16_t* out) {
  scale_body(x, w, v, eps, rows, d, off, out);
}
#if defined(__x86_64__) || defined(_M_X64)
// "avx2" alone, without "fma": no multiply-add may be contracted into an FMA, whose
// single rounding would differ from eager's two.
__attribute__((target("avx2"))) void squares_avx2(const uint16_t* x, float* sq, int64_t n) {
  squares_body(x, sq, n);
}
__attribute__((target("avx2"))) void scale_avx2(const uint16_t* x, const uint16_t* w,
                                                const float* v, float eps, int64_t rows,
                                                int64_t d, bool off, uint16_t* out) {
  scale_body(x, w, v, eps, rows, d, off, out);
}
#endif

// Which build of the loops runs: avx2 where the CPU has it, unless SPARAMX_KERNEL names
// the portable kernel (so tests reach both on one machine).
bool norm_uses_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  const char* env = std::getenv("SPARAMX_KERNEL");
  if (env && std::string(env) == "portable") return false;
  return cpu_features().can_avx2();
#else
  return false;
#endif
}

// The elementwise steps by hand, around ATen's own mean: x.float() and h * h are exact
// per element, `variance + eps` and rsqrt (1 / sqrt, as ATen's CPU kernel computes it)
// are correctly rounded IEEE operations, and bf16 results round to nearest even as
// c10::BFloat16 does, so only the mean's reduction order could differ, and that runs
// in ATen. Saves the allocation and dispatch of seven ATen ops per call (~13 -> ~4 us).
at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& weight, double eps,
                          bool offset_weight) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const bool avx2 = norm_uses_avx2();
  at::Tensor sq = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  float* sp = sq.data_ptr<float>();
#if defined(__x86_64__) || defined(_M_X64)
  avx2 ? squares_avx2(xp, sp, rows * d) : squares_generic(xp, sp, rows * d);
#else
  squares_generic(xp, sp, rows * d);
#endif
  const at::Tensor variance = sq.mean(-1, /*keepdim=*/true);
  const float* vp = variance.data_ptr<float>();
  at::Tensor out = at::empty(x.sizes(), x.options());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float feps = static_cast<float>(eps);
#if defined(__x86_64__) || defined(_M_X64)
  if (avx2) {
    scale_avx2(xp, wp, vp, feps, rows, d, offset_weight, op);
    return out;
  }
#endif
  scale_generic(xp, wp, vp, feps, rows, d, offset_weight, op);
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    bool offset_weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "sparamx::rms_norm: CPU tensors expected");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "sparamx::rms_norm: weight of shape [", weight.size(0), "] does not match the "
              "last dimension of x ", x.sizes());
  // The fused path covers the decode loop's case (bf16 activations and weight,
  // contiguous); the weight * h product of the non-offset form is computed in the
  // weight's dtype there, which the fused path matches only when both are bf16.
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
      x.is_contiguous() && weight.is_contiguous() && x.numel() > 0)
    return rms_norm_fused(x, weight, eps, offset_weight);
  at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  if (offset_weight) return (h * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

}  // namespace

const char* norm_kernel_name() { return norm_uses_avx2() ? "avx2" : "portable"; }

TORCH_LIBRARY_FRAGMENT(sparamx, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool offset_weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("rms_norm", &rms_norm); }

}  // namespace sparamx
