"""Shared benchmark helpers: timing (median of repeats and its spread), memory-bandwidth
probe, the environment record every JSON carries, tables and their warnings."""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import time
from pathlib import Path


def repeat_times_us(fn, repeats: int, inner: int = 1) -> list[float]:
    """The mean time of ``inner`` back-to-back calls (µs), ``repeats`` times."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter_ns() - t0) / inner / 1e3)
    return times


def median_time_us(fn, repeats: int, inner: int = 1) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls (µs)."""
    return statistics.median(repeat_times_us(fn, repeats, inner))


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
    """Measured DRAM read bandwidth (GB/s): ``sparamx.pipeline.bench.dram_read_gbps``."""
    from sparamx.pipeline.bench import dram_read_gbps

    return dram_read_gbps(threads, mbytes, repeats)


def environment(threads: int | None = None) -> dict:
    """``sparamx.pipeline.bench.machine_record`` (CPU model, ISA class, sparamx kernel per path,
    threads, torch / transformers versions, command line, load average) plus the full
    ``kernel_info()``: the one record every bench JSON carries."""
    from sparamx import kernel_info
    from sparamx.pipeline.bench import machine_record

    return {
        **machine_record(threads),
        "cpu": platform.processor() or platform.machine(),
        "kernel_info": kernel_info(),
    }


def print_flags(rows: list[dict], label) -> None:
    """Print every row's ``flags`` as WARNING lines under a table (``label(row)`` names
    the row)."""
    flagged = [(label(r), f) for r in rows for f in r.get("flags", [])]
    if flagged:
        print()
        for name, f in flagged:
            print(f"WARNING: {name}: {f}")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); a key a row lacks shows as "-"."""
    cells = [[_cell(r.get(k), f) for k, _, f in columns] for r in rows]
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
