"""Builds the native extension ``sparamx._C`` (torch cpp_extension + ninja).

One extension holds every kernel: each ISA's source selects its own instruction set
with ``#pragma GCC target`` (never ``-march=native``: the build must run on other
CPUs than the one that built it), and the kernel is chosen at run time from CPUID.
"""

import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = "sparamx/csrc/"
sources = [
    "ops.cpp",
    "probe.cpp",
    "cpu_features.cpp",
    "kernel_portable.cpp",
    "kernel_amx_emu.cpp",
    "kernel_int8_amx.cpp",
    "attention_ops.cpp",
    "attention_portable.cpp",
    "norm_ops.cpp",
]
if platform.machine().lower() in ("x86_64", "amd64"):
    sources += [
        "kernel_avx2.cpp",
        "kernel_avx512.cpp",
        "kernel_amx.cpp",
        "attention_avx2.cpp",
        "attention_avx512.cpp",
    ]
else:  # the x86 kernels cannot be compiled here; ops.cpp refuses them at run time
    sources += ["kernel_x86_absent.cpp"]

setup(
    ext_modules=[
        CppExtension(
            "sparamx._C",
            [CSRC + s for s in sources],
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
