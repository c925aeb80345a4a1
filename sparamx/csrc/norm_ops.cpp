// sparamx::rms_norm: the RMSNorm of transformers' Llama-family and Gemma modules, as
// the same sequence of ATen calls their eager forward makes, so the result is bitwise
// the eager module's (the same kernels run in the same order). The lean decode loop
// (sparamx/generate.py) calls it from the compiled decode step instead of calling the
// Python module back: same floats as `model.generate`, without a Python round trip per
// norm (measured on SmolLM2-135M: 61 norms per token, ~74 us each through Python).
//
//   offset_weight = false (Llama, Qwen2, Mistral, ...):
//     h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); weight * h.to(x.dtype)
//   offset_weight = true (Gemma):
//     h = x.float(); h = h * rsqrt(mean(h^2, -1) + eps); (h * (1 + weight.float())).to(x.dtype)
//
// Which form a given module computes is checked bitwise on sample inputs before use;
// modules matching neither stay on their own forward.
#include <torch/extension.h>
#include <torch/library.h>

namespace sparamx {
namespace {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                    bool offset_weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "sparamx::rms_norm: CPU tensors expected");
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && x.size(-1) == weight.size(0),
              "sparamx::rms_norm: weight of shape [", weight.size(0), "] does not match the "
              "last dimension of x ", x.sizes());
  at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(variance + eps);
  if (offset_weight) return (h * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparamx, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool offset_weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) { m.impl("rms_norm", &rms_norm); }

}  // namespace sparamx
