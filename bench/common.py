"""Shared benchmark helpers: timing (median of repeats), memory-bandwidth probe, tables."""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def median_time_us(fn, repeats: int, inner: int = 1) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls (µs)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter_ns() - t0) / inner / 1e3)
    return statistics.median(times)


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache from sysfs (Linux), else ``default``."""
    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(f).read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes, default=default)


def read_bandwidth_gbps(threads: int, mbytes: int = 1024, repeats: int = 5) -> float:
    """Measured DRAM read bandwidth (GB/s): ``sparamx.bench.dram_read_gbps``."""
    from sparamx.bench import dram_read_gbps

    return dram_read_gbps(threads, mbytes, repeats)


def environment() -> dict:
    from sparamx import kernel_info
    from sparamx.report import _cpu_model

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "kernel_info": kernel_info(),
        "cores": os.cpu_count(),
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[_cell(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def write_json(path: str, payload) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _cell(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return format(v, spec)
