"""What this CPU is, for the choices and records that depend on it.

- :func:`cpu_isa`: the ISA class that decides our kernels' tier and whether torch has a
  fast bf16 matmul: ``amx`` (AMX-BF16 tiles usable), ``avx512-bf16`` (AVX-512 with the
  bf16 dot product), ``avx2`` (AVX2 + FMA, no bf16 arithmetic) or ``portable``.
- :func:`cpu_model_name`: the marketing name (``/proc/cpuinfo``'s ``model name``).
- :func:`resolve_compute_dtype`: the dtype calibration, the dense evaluations and the
  stock baseline compute in (``model.compute_dtype``; ``auto`` decides by the ISA).

Why the compute dtype depends on the CPU: torch's bf16 matmul runs on the bf16 dot
product instructions (oneDNN: ``vdpbf16ps`` on AVX-512-BF16, ``tdpbf16ps`` on AMX).
Without them each bf16 operand is widened to fp32 in a slow path: on a Zen 3
(AVX2 + FMA) a 256x896 @ 896x4864 bf16 matmul ran at 3.4 GFLOP/s against 22 in fp32
(1 thread), so Wanda calibration and lm-eval took ~10x their Zen 4 time in bf16.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

ISA_CLASSES = ("amx", "avx512-bf16", "avx2", "portable")
# Where torch's bf16 matmul is fast (a native bf16 dot product): bf16 is then the
# cheaper compute dtype (half the bytes, same FLOP rate or better).
FAST_BF16_ISAS = ("amx", "avx512-bf16")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


def cpu_model_name() -> str:
    """``model name`` from /proc/cpuinfo (Linux x86), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model name")):  # x86 / some aarch64 kernels
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _proc_flags() -> set[str]:
    """The CPU flags the kernel lists (x86 ``flags``, aarch64 ``Features``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_from_features(cpu: dict) -> str:
    """The ISA class of a ``sparamx.kernel_info()["cpu"]`` feature dict (CPUID + the OS
    state bits: a CPU whose OS does not save zmm or tile state cannot use them)."""
    if cpu.get("amx_tile") and cpu.get("amx_bf16") and cpu.get("os_amx"):
        return "amx"
    if cpu.get("avx512f") and cpu.get("avx512_bf16") and cpu.get("os_avx512"):
        return "avx512-bf16"
    avx2 = cpu.get("avx2")
    if avx2 is None:  # builds whose kernel_info does not list AVX2: ask torch / the OS
        avx2 = _torch_has_avx2()
    if avx2 and cpu.get("fma", True):
        return "avx2"
    return "portable"


def _torch_has_avx2() -> bool:
    try:
        import torch

        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            return True
    except (ImportError, AttributeError):
        pass
    return {"avx2", "fma"} <= _proc_flags()


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """This CPU's ISA class (one of ``ISA_CLASSES``), from sparamx's own detection
    (``kernel_info()``: CPUID, XGETBV and Linux's AMX permission) when the extension is
    built, else from /proc/cpuinfo's flags. The one place the rest asks."""
    try:
        from .ops import kernel_info

        return isa_from_features(kernel_info()["cpu"])
    except ImportError:  # no native build: the OS's view (no AMX permission check)
        flags = _proc_flags()
        return isa_from_features(
            {
                "amx_tile": "amx_tile" in flags,
                "amx_bf16": "amx_bf16" in flags,
                "os_amx": "amx_tile" in flags,
                "avx512f": "avx512f" in flags,
                "avx512_bf16": "avx512_bf16" in flags,
                "os_avx512": "avx512f" in flags,
                "avx2": "avx2" in flags,
                "fma": "fma" in flags,
            }
        )


def has_fast_bf16_matmul(isa: str | None = None) -> bool:
    """Whether torch's bf16 matmul runs on a native bf16 dot product here."""
    return (cpu_isa() if isa is None else isa) in FAST_BF16_ISAS


@dataclass(frozen=True)
class ComputeDtype:
    """A resolved ``model.compute_dtype``: what was asked, what it is, and why."""

    requested: str  # auto | bfloat16 | float32
    resolved: str  # bfloat16 | float32
    reason: str
    isa: str
    cpu: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_compute_dtype(requested: str = "auto", weights_dtype: str = "bfloat16") -> ComputeDtype:
    """The dtype to compute in. ``bfloat16`` / ``float32``: as asked. ``auto``:
    ``float32`` when the weights are loaded in fp32 (``model.dtype: float32`` asks for
    fp32 precision, so old configs keep their meaning) or when the CPU has no fast bf16
    matmul (no AVX-512-BF16, no AMX-BF16); ``bfloat16`` otherwise."""
    if requested not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {requested!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    isa, cpu = cpu_isa(), cpu_model_name()
    if requested != "auto":
        return ComputeDtype(requested, requested, f"set to {requested} in the config", isa, cpu)
    if weights_dtype in ("float32", "fp32"):
        why = "auto: model.dtype is float32, so the model computes in fp32 as loaded"
        return ComputeDtype(requested, "float32", why, isa, cpu)
    if has_fast_bf16_matmul(isa):
        why = f"auto: the CPU ({isa}) has a bf16 dot product, so torch's bf16 matmul is fast"
        return ComputeDtype(requested, "bfloat16", why, isa, cpu)
    why = (
        f"auto: the CPU ({isa}) has no AVX-512-BF16 or AMX-BF16, where torch's bf16 "
        "matmul is several times slower than fp32"
    )
    return ComputeDtype(requested, "float32", why, isa, cpu)
