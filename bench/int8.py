"""Int8 weight benchmark: bitmap-int8 vs bitmap-bf16 (sparamx) vs torch bf16 ``F.linear``.

For each shape [N, K], batch rows M, sparsity and thread count, times the three in the
same run (interleaved, median of repeats) with DRAM-resident weights: each side cycles
through enough copies of its weight to exceed 3x the last-level cache (copies of the
same packed tensors: residency needs distinct memory, not distinct values).

    python bench/int8.py                                  # 14336x4096 and 4096x4096, M=1, 50%
    python bench/int8.py --shapes 4096x4096 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    last_level_cache_bytes,
    print_table,
    read_bandwidth_gbps,
    repeat_times_us,
    write_json,
)

from sparamx.format import pack  # noqa: E402
from sparamx.ops import packed_linear  # noqa: E402

DRAM_BYTES = max(384 << 20, 3 * last_level_cache_bytes())


def sparse_weight(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    if sparsity > 0:  # exact per-row sparsity, random positions
        idx = torch.rand(n, k, generator=g).argsort(dim=1)[:, : int(round(sparsity * k))]
        w.scatter_(1, idx, 0)
    return w


def copies(nbytes: int) -> int:
    return max(2, -(-DRAM_BYTES // nbytes))


def set_dram_bytes(mb: int | None) -> None:
    global DRAM_BYTES
    if mb:
        DRAM_BYTES = mb << 20


def runner(x, make_call, nbytes):
    """A function that calls the next of ``copies(nbytes)`` copies each time, and the count."""
    calls = [make_call() for _ in range(copies(nbytes))]
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(calls)
        calls[i](x)

    return run, len(calls)


def packed_call(p):
    from sparamx.format import PackedWeight

    def make():
        t = {key: v.clone() for key, v in p.tensors().items()}
        q = PackedWeight(
            p.shape, p.storage, t["values"], t.get("bitmap"), t.get("offsets"), t.get("scales")
        )
        return lambda x: packed_linear(x, q)

    return make


def torch_call(w):
    def make():
        wc = w.clone()
        return lambda x: F.linear(x, wc)

    return make


def bench(n, k, m, sparsity, threads, repeats):
    w = sparse_weight(n, k, sparsity)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    packs = {s: pack(w, storage=s) for s in ("bitmap-int8", "bitmap-bf16")}
    sides = {"torch": runner(x, torch_call(w), n * k * 2)}
    for s, p in packs.items():
        sides[s] = runner(x, packed_call(p), p.nbytes)
    torch.set_num_threads(threads)
    for run, count in sides.values():  # warm-up: one full cycle each
        for _ in range(count):
            run()
    times = {s: [] for s in sides}
    for _ in range(repeats):
        for s, (run, count) in sides.items():
            times[s] += repeat_times_us(run, 1, count)
    med = {s: sorted(t)[len(t) // 2] for s, t in times.items()}
    nbytes = {"torch": n * k * 2, **{s: p.nbytes for s, p in packs.items()}}
    return {
        "shape": [n, k],
        "m": m,
        "sparsity": sparsity,
        "threads": threads,
        "torch_us": med["torch"],
        "bf16_us": med["bitmap-bf16"],
        "int8_us": med["bitmap-int8"],
        "int8_vs_bf16": med["bitmap-bf16"] / med["bitmap-int8"],
        "int8_vs_torch": med["torch"] / med["bitmap-int8"],
        "bf16_vs_torch": med["torch"] / med["bitmap-bf16"],
        "int8_gbps": nbytes["bitmap-int8"] / med["bitmap-int8"] / 1e3,
        "bf16_gbps": nbytes["bitmap-bf16"] / med["bitmap-bf16"] / 1e3,
        "int8_mb": nbytes["bitmap-int8"] / 1e6,
        "bf16_mb": nbytes["bitmap-bf16"] / 1e6,
        "int8_us_min": min(times["bitmap-int8"]),
        "int8_us_max": max(times["bitmap-int8"]),
        "bf16_us_min": min(times["bitmap-bf16"]),
        "bf16_us_max": max(times["bitmap-bf16"]),
        "copies": {s: c for s, (_, c) in sides.items()},
    }


COLUMNS = [
    ("shape", "N x K", ""),
    ("m", "M", "d"),
    ("sparsity", "sp", ".2f"),
    ("threads", "thr", "d"),
    ("torch_us", "torch us", ".1f"),
    ("bf16_us", "bf16 us", ".1f"),
    ("int8_us", "int8 us", ".1f"),
    ("int8_vs_bf16", "int8/bf16 x", ".2f"),
    ("int8_vs_torch", "int8/torch x", ".2f"),
    ("bf16_vs_torch", "bf16/torch x", ".2f"),
    ("bf16_gbps", "bf16 GB/s", ".1f"),
    ("int8_gbps", "int8 GB/s", ".1f"),
    ("int8_us_min", "int8 min", ".1f"),
    ("int8_us_max", "int8 max", ".1f"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="14336x4096,4096x4096", help="NxK list")
    ap.add_argument("--m", default="1")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dram-mb", type=int, default=None, help="bytes cycled per side (smoke tests)")
    args = ap.parse_args(argv)
    set_dram_bytes(args.dram_mb)
    threads = [int(t) for t in args.threads.split(",")]
    bw = {t: read_bandwidth_gbps(t) for t in threads}
    print("measured read bandwidth: " + ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in bw.items()))
    rows = []
    for s in args.shapes.split(","):
        n, k = (int(v) for v in s.lower().split("x"))
        for sp in (float(v) for v in args.sparsity.split(",")):
            for m in (int(v) for v in args.m.split(",")):
                for t in threads:
                    rows.append(bench(n, k, m, sp, t, args.repeats))
                    print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    if args.json:
        env = environment()
        write_json(args.json, {"env": env, "bandwidth_gbps": bw, "records": rows})


if __name__ == "__main__":
    main()
