// torch glue: argument checks, kernel choice, threading, and the sparamx:: custom ops.
//
// Ops (schemas below; fake kernels are registered from Python):
//   sparamx::sparse_linear(x, bitmap, values, offsets, bias?, n, k)  bitmap-bf16 layout
//   sparamx::dense_linear(x, values, bias?, n, k)                     dense-bf16 layout
//   sparamx::linear_with_kernel(..., impl)  same, with the kernel named (tests, benches)
//   sparamx::sparse_linear_int8(x, bitmap, values, offsets, scales, bias?, n, k)  bitmap-int8
//   sparamx::dense_linear_int8(x, values, scales, bias?, n, k)                     dense-int8
//   sparamx::linear_int8_with_kernel(..., impl)
// The int8 layouts run the linear_int8_* kernel of the chosen tier; on the AMX tier (real
// or emulated) that converts chunks to bf16 for the tile kernel above kDecodeRows rows
// and streams int8 with AVX-512's (or the portable) decode kernel below
// (kernel_int8_amx.cpp).
// x is [M, k] bf16 or fp32; the result is [M, n] in x's dtype. Weights are bf16 and the
// products are accumulated in fp32 (fp32 inputs are rounded to bf16 first, as in a bf16
// F.linear). The raw ops check shapes and dtypes and the offsets' total; that bitmap
// popcounts agree with offsets is checked once, when a PackedWeight is built or loaded.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cpu_features.h"
#include "kernels.h"
#include "paths.h"

namespace sparamx {
namespace {

using KernelFn = void (*)(const LinearArgs&, int64_t, int64_t);


struct Kernel {
  const char* name;
  KernelFn fn;
  KernelFn int8_fn;  // the same tier's kernel for the int8 layouts
};

bool compiled_x86() {
#if defined(__x86_64__) || defined(_M_X64)
  return true;
#else
  return false;
#endif
}

Kernel kernel_by_name(const std::string& name) {
  const auto& f = cpu_features();
  if (name == "portable") return {"portable", linear_portable, linear_int8_portable};
  if (name == "amx_emulated")
    return {"amx_emulated", linear_amx_emulated, linear_int8_amx_emulated};
#if defined(__x86_64__) || defined(_M_X64)
  if (name == "avx2") {
    TORCH_CHECK(f.can_avx2(),
                "sparamx: kernel 'avx2' needs AVX2/FMA/F16C/BMI2/POPCNT, which this CPU (or OS) "
                "does not provide; use SPARAMX_KERNEL=portable or leave it unset");
    return {"avx2", linear_avx2, linear_int8_avx2};
  }
  if (name == "avx512") {
    TORCH_CHECK(f.can_avx512(),
                "sparamx: kernel 'avx512' needs AVX-512 F/BW/VL/DQ/BF16/VBMI/VBMI2, which this CPU "
                "(or OS) does not provide; use SPARAMX_KERNEL=avx2|portable or leave it unset");
    return {"avx512", linear_avx512, linear_int8_avx512};
  }
  if (name == "amx") {
    TORCH_CHECK(f.can_amx(),
                "sparamx: kernel 'amx' needs AMX-TILE/AMX-BF16 (and OS permission), which this "
                "CPU does not provide; use SPARAMX_KERNEL=avx512|avx2|portable or leave it unset");
    return {"amx", linear_amx, linear_int8_amx};
  }
#else
  TORCH_CHECK(name != "avx512" && name != "amx" && name != "avx2", "sparamx: kernel '", name,
              "' is x86-only and was not compiled for this CPU architecture");
#endif
  TORCH_CHECK(false, "sparamx: unknown kernel '", name,
              "'; allowed: amx, avx512, avx2, portable, amx_emulated");
}

const char* forced_kernel() {
  const char* env = std::getenv("SPARAMX_KERNEL");
  return (env && *env && std::string(env) != "auto") ? env : nullptr;
}

// The kernel for a call with m rows: SPARAMX_KERNEL if set, else the best the CPU has:
// AMX > AVX-512-BF16 > AVX2 > portable, except that decode prefers AVX-512, which
// streams bytes with less overhead than tile loads (prefill prefers AMX's 16x32x16 tile
// multiply).
Kernel choose_kernel(int64_t m) {
  if (const char* env = forced_kernel()) return kernel_by_name(env);
  const auto& f = cpu_features();
  if (m > kDecodeRows && f.can_amx()) return kernel_by_name("amx");
  if (f.can_avx512()) return kernel_by_name("avx512");
  if (f.can_amx()) return kernel_by_name("amx");
  if (f.can_avx2()) return kernel_by_name("avx2");
  return kernel_by_name("portable");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_x(const at::Tensor& x, int64_t n, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "sparamx: input must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "sparamx: input dtype must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "sparamx: input must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == k, "sparamx: input has ", x.size(1), " features but the weight has K=",
              k);
  TORCH_CHECK(n >= 1 && k >= 1, "sparamx: weight shape must be positive, got N=", n, " K=", k);
}

// `scales` set: an int8 layout (values int8, scales fp32 [G, KB, 16]).
at::Tensor run(const Kernel& kernel, const at::Tensor& x, const at::Tensor* bitmap,
               const at::Tensor& values, const at::Tensor* offsets,
               const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
               const at::Tensor* scales = nullptr) {
  check_x(x, n, k);
  const int64_t groups = ceil_div(n, kGroupCols);
  const int64_t kp = ceil_div(k, kKAlign) * kKAlign;
  const int64_t pairs = kp / 2;
  const int64_t k_blocks = ceil_div(pairs, kQBlockPairs);
  const int64_t pad = scales ? kValuesPadI8 : kValuesPad;
  if (scales) {
    TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 1 &&
                    values.is_contiguous() && values.device().is_cpu(),
                "sparamx: int8 layouts need values as a contiguous 1-D int8 CPU tensor, got ",
                values.scalar_type(), " ", values.sizes());
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                    scales->device().is_cpu() && scales->dim() == 3 &&
                    scales->size(0) == groups && scales->size(1) == k_blocks &&
                    scales->size(2) == kGroupCols,
                "sparamx: scales must be a contiguous float32 CPU tensor of shape [", groups,
                ", ", k_blocks, ", ", kGroupCols, "] for N=", n, " K=", k, ", got ",
                scales->scalar_type(), " ", scales->sizes());
  } else {
    TORCH_CHECK(values.scalar_type() == at::kBFloat16 && values.dim() == 1 &&
                    values.is_contiguous() && values.device().is_cpu(),
                "sparamx: values must be a contiguous 1-D bfloat16 CPU tensor");
  }
  if (bitmap) {
    TORCH_CHECK(bitmap->scalar_type() == at::kInt && bitmap->is_contiguous() &&
                    bitmap->device().is_cpu() && bitmap->dim() == 2 &&
                    bitmap->size(0) == groups && bitmap->size(1) == pairs,
                "sparamx: bitmap must be a contiguous int32 CPU tensor of shape [", groups, ", ",
                pairs, "] for N=", n, " K=", k, ", got ", bitmap->scalar_type(), " ",
                bitmap->sizes());
    TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->is_contiguous() &&
                    offsets->dim() == 1 && offsets->size(0) == groups + 1,
                "sparamx: offsets must be a contiguous int64 tensor of length ", groups + 1);
    const int64_t* off = offsets->data_ptr<int64_t>();
    TORCH_CHECK(off[0] == 0 && off[groups] + pad == values.numel(),
                "sparamx: offsets do not match values (offsets[0]=", off[0], ", offsets[-1]=",
                off[groups], ", values has ", values.numel(), " = nnz + ", pad,
                " padding expected)");
  } else {
    TORCH_CHECK(values.numel() == groups * pairs * kUnitVals,
                "sparamx: dense values must hold ", groups * pairs * kUnitVals,
                scales ? " int8" : " bf16", " for N=", n, " K=", k, ", got ", values.numel());
  }
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "sparamx: bias must have shape [", n,
                "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  // Activations as bf16, rows padded with zeros to Kp (the kernels read whole pairs/tiles).
  at::Tensor xb;
  if (x.scalar_type() == at::kBFloat16 && k == kp && x.stride(1) == 1) {
    xb = x;
  } else {
    xb = at::zeros({x.size(0), kp}, x.options().dtype(at::kBFloat16));
    xb.narrow(1, 0, k).copy_(x);
  }
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  LinearArgs a;
  a.x = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  a.x_stride = xb.stride(0);
  a.m = m;
  a.k_pairs = pairs;
  a.n = n;
  a.bitmap = bitmap ? reinterpret_cast<const uint32_t*>(bitmap->data_ptr<int32_t>()) : nullptr;
  if (scales) {
    a.values = nullptr;
    a.qvalues = values.data_ptr<int8_t>();
    a.scales = scales->data_ptr<float>();
    a.k_blocks = k_blocks;
  } else {
    a.values = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  }
  a.offsets = offsets ? offsets->data_ptr<int64_t>() : nullptr;
  a.bias = bias.has_value() ? b.data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.y_stride = y.stride(0);
  a.y_bf16 = y.scalar_type() == at::kBFloat16;
  // Split over blocks of 4 column groups; give each task at least ~256 KiB of weight
  // work so that thread start-up does not dominate small layers.
  constexpr int64_t kBlock = 4;
  const int64_t blocks = ceil_div(groups, kBlock);
  const int64_t block_work = kBlock * kGroupCols * kp * 2 * std::max<int64_t>(1, m / 4);
  const int64_t grain = std::max<int64_t>(1, (int64_t{256} << 10) / block_work);
  const KernelFn fn = scales ? kernel.int8_fn : kernel.fn;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(a, b0 * kBlock, std::min(b1 * kBlock, groups));
  });
  return y;
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                         const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                         int64_t n, int64_t k) {
  return run(choose_kernel(x.size(0)), x, &bitmap, values, &offsets, bias, n, k);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& values,
                        const c10::optional<at::Tensor>& bias, int64_t n, int64_t k) {
  return run(choose_kernel(x.size(0)), x, nullptr, values, nullptr, bias, n, k);
}

at::Tensor linear_with_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& bitmap,
                              const at::Tensor& values, const c10::optional<at::Tensor>& offsets,
                              const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                              c10::string_view kernel) {
  TORCH_CHECK(bitmap.has_value() == offsets.has_value(),
              "sparamx: bitmap and offsets go together (sparse) or are both None (dense)");
  const Kernel kern = kernel_by_name(std::string(kernel));
  return run(kern, x, bitmap ? &*bitmap : nullptr, values, offsets ? &*offsets : nullptr, bias, n,
             k);
}

at::Tensor sparse_linear_int8(const at::Tensor& x, const at::Tensor& bitmap,
                              const at::Tensor& values, const at::Tensor& offsets,
                              const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                              int64_t n, int64_t k) {
  return run(choose_kernel(x.size(0)), x, &bitmap, values, &offsets, bias, n, k, &scales);
}

at::Tensor dense_linear_int8(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                             int64_t n, int64_t k) {
  return run(choose_kernel(x.size(0)), x, nullptr, values, nullptr, bias, n, k, &scales);
}

at::Tensor linear_int8_with_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& bitmap,
                                   const at::Tensor& values,
                                   const c10::optional<at::Tensor>& offsets,
                                   const at::Tensor& scales,
                                   const c10::optional<at::Tensor>& bias, int64_t n, int64_t k,
                                   c10::string_view kernel) {
  TORCH_CHECK(bitmap.has_value() == offsets.has_value(),
              "sparamx: bitmap and offsets go together (sparse) or are both None (dense)");
  const Kernel kern = kernel_by_name(std::string(kernel));
  return run(kern, x, bitmap ? &*bitmap : nullptr, values, offsets ? &*offsets : nullptr, bias, n,
             k, &scales);
}

py::dict kernel_info() {
  const auto& f = cpu_features();
  py::dict cpu;
  cpu["x86"] = f.x86;
  cpu["avx2"] = f.avx2;
  cpu["fma"] = f.fma;
  cpu["f16c"] = f.f16c;
  cpu["bmi2"] = f.bmi2;
  cpu["popcnt"] = f.popcnt;
  cpu["os_avx"] = f.os_avx;
  cpu["avx512f"] = f.avx512f;
  cpu["avx512bw"] = f.avx512bw;
  cpu["avx512vl"] = f.avx512vl;
  cpu["avx512dq"] = f.avx512dq;
  cpu["avx512_bf16"] = f.avx512_bf16;
  cpu["avx512_vbmi"] = f.avx512_vbmi;
  cpu["avx512_vbmi2"] = f.avx512_vbmi2;
  cpu["os_avx512"] = f.os_avx512;
  cpu["amx_tile"] = f.amx_tile;
  cpu["amx_bf16"] = f.amx_bf16;
  cpu["os_amx"] = f.os_amx;
  py::list compiled;
  compiled.append("portable");
  compiled.append("amx_emulated");
  if (compiled_x86()) {
    compiled.append("avx2");
    compiled.append("avx512");
    compiled.append("amx");
  }
  py::dict info;
  info["cpu"] = cpu;
  info["compiled"] = compiled;
  const char* env = forced_kernel();
  info["forced"] = env ? py::cast(std::string(env)) : py::none();
  info["decode"] = choose_kernel(1).name;
  info["prefill"] = choose_kernel(kDecodeRows + 1).name;
  // Every native path and the kernel it runs now (the linear ops serve both the bitmap
  // and the dense layout, so DenseLinear, lm_head and a tied embedding follow them).
  py::dict paths;
  paths["linear_decode"] = choose_kernel(1).name;
  paths["linear_prefill"] = choose_kernel(kDecodeRows + 1).name;
  paths["dense_decode"] = choose_kernel(1).name;
  paths["dense_prefill"] = choose_kernel(kDecodeRows + 1).name;
  paths["int8_decode"] = choose_kernel(1).name;
  paths["int8_prefill"] = choose_kernel(kDecodeRows + 1).name;
  paths["attention"] = attention_kernel_name();
  paths["norm"] = norm_kernel_name();
  info["paths"] = paths;
  info["decode_max_rows"] = kDecodeRows;
  info["threads"] = at::get_num_threads();
  return info;
}

}  // namespace

TORCH_LIBRARY(sparamx, m) {
  m.def("sparse_linear(Tensor x, Tensor bitmap, Tensor values, Tensor offsets, Tensor? bias, "
        "int n, int k) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor values, Tensor? bias, int n, int k) -> Tensor");
  // The kernel-name argument is `impl`, not `kernel`: inductor lowers custom ops through
  // FallbackKernel.create(kernel, ...), and an op argument named `kernel` collides with it.
  m.def("linear_with_kernel(Tensor x, Tensor? bitmap, Tensor values, Tensor? offsets, "
        "Tensor? bias, int n, int k, str impl) -> Tensor");
  m.def("sparse_linear_int8(Tensor x, Tensor bitmap, Tensor values, Tensor offsets, "
        "Tensor scales, Tensor? bias, int n, int k) -> Tensor");
  m.def("dense_linear_int8(Tensor x, Tensor values, Tensor scales, Tensor? bias, int n, int k) "
        "-> Tensor");
  m.def("linear_int8_with_kernel(Tensor x, Tensor? bitmap, Tensor values, Tensor? offsets, "
        "Tensor scales, Tensor? bias, int n, int k, str impl) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparamx, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("dense_linear", &dense_linear);
  m.impl("linear_with_kernel", &linear_with_kernel);
  m.impl("sparse_linear_int8", &sparse_linear_int8);
  m.impl("dense_linear_int8", &dense_linear_int8);
  m.impl("linear_int8_with_kernel", &linear_int8_with_kernel);
}

}  // namespace sparamx

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparamx native kernels (ops are registered under torch.ops.sparamx)";
  m.def("kernel_info", &sparamx::kernel_info, "detected CPU features and the kernel per path");
}
