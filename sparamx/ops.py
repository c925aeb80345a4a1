"""Python side of the native ops: loads ``sparamx._C`` (which registers
``torch.ops.sparamx.*``), gives each op a fake kernel so ``torch.compile`` can trace
it, and exposes thin wrappers. ``packed_linear`` picks the op from the storage (the int8
storages call ``sparse_linear_int8`` / ``dense_linear_int8``).

Kernel names: ``amx``, ``avx512``, ``avx2``, ``portable`` (``SPARAMX_KERNEL`` forces one) and
``amx_emulated`` (the AMX kernel on emulated tiles; for tests on CPUs without AMX).
"""

from __future__ import annotations

import os

import torch

from .format import PackedWeight

try:
    from . import _C  # noqa: F401  (registers torch.ops.sparamx)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "sparamx's native extension is not built: run `pip install --no-build-isolation -e .` "
        f"in the repository ({e})"
    ) from e

KERNELS = ("amx", "avx512", "avx2", "portable")
TEST_KERNELS = (*KERNELS, "amx_emulated")


def _out_shape(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("sparamx::sparse_linear")
def _(x, bitmap, values, offsets, bias, n, k):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::dense_linear")
def _(x, values, bias, n, k):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::linear_with_kernel")
def _(x, bitmap, values, offsets, bias, n, k, impl):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::sparse_linear_int8")
def _(x, bitmap, values, offsets, scales, bias, n, k):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::dense_linear_int8")
def _(x, values, scales, bias, n, k):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::linear_int8_with_kernel")
def _(x, bitmap, values, offsets, scales, bias, n, k, impl):
    torch._check(x.dim() == 2 and x.shape[1] == k)
    return _out_shape(x, n)


@torch.library.register_fake("sparamx::rms_norm")
def _(x, weight, eps, offset_weight):
    dtype = x.dtype if offset_weight else torch.promote_types(weight.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=dtype)


def packed_linear(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """``x[M, K] @ W.T + bias`` with the packed weight; ``kernel`` names one explicitly."""
    n, k = packed.shape
    if kernel is not None and kernel not in TEST_KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {TEST_KERNELS}")
    if packed.is_int8:
        p = packed
        if kernel is not None:
            return torch.ops.sparamx.linear_int8_with_kernel(
                x, p.bitmap, p.values, p.offsets, p.scales, bias, n, k, kernel
            )
        if p.bitmap is None:
            return torch.ops.sparamx.dense_linear_int8(x, p.values, p.scales, bias, n, k)
        return torch.ops.sparamx.sparse_linear_int8(
            x, p.bitmap, p.values, p.offsets, p.scales, bias, n, k
        )
    if kernel is not None:
        return torch.ops.sparamx.linear_with_kernel(
            x, packed.bitmap, packed.values, packed.offsets, bias, n, k, kernel
        )
    if packed.storage == "dense-bf16":
        return torch.ops.sparamx.dense_linear(x, packed.values, bias, n, k)
    return torch.ops.sparamx.sparse_linear(
        x, packed.bitmap, packed.values, packed.offsets, bias, n, k
    )


def kernel_info() -> dict:
    """Detected CPU features, compiled kernels, and the kernel each path uses now."""
    info = dict(_C.kernel_info())
    info["env"] = os.environ.get("SPARAMX_KERNEL")
    return info
