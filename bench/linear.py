"""Linear-layer benchmark: torch bf16 ``F.linear`` vs sparamx packed kernels.

For each shape [N, K], batch rows M, sparsity and thread count, times both in the
same run (interleaved, median of repeats) with the weights either cache-resident
(one weight reused) or DRAM-resident (cycling through enough distinct weights to
exceed the caches). Reports the ratio torch/ours and GB/s of bytes read against the
measured read bandwidth, the min / max of each side's repeats, and flags (``!`` in the
table, a WARNING line under it, ``flags`` in the JSON) a case whose repeats disagree by
more than 20% or whose torch baseline is slower with more threads.

    python bench/linear.py                       # the full table
    python bench/linear.py --shapes llama --m 1 --sparsity 0.5 --threads 1
    python bench/linear.py --json out.json
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
    median_time_us,
    print_flags,
    print_table,
    read_bandwidth_gbps,
    write_json,
)

from sparamx.format import pack  # noqa: E402
from sparamx.ops import packed_linear  # noqa: E402
from sparamx.pipeline.bench import spread, spread_flags, thread_scaling_flags  # noqa: E402

SHAPES = {
    "smollm": [(576, 576), (1536, 576), (576, 1536)],
    "llama": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
# Cycle through at least this many weight bytes: 384 MiB, or 3x the last-level cache where
# that is larger (an AMX Xeon seen here reports 300 MiB of L3).
DRAM_BYTES = max(384 << 20, 3 * last_level_cache_bytes())


def make_weights(n: int, k: int, sparsity: float, copies: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense, packed = [], []
    for _ in range(copies):
        w = torch.randn(n, k, generator=g, dtype=torch.float32).to(torch.bfloat16)
        if sparsity > 0:  # exact per-row sparsity, random positions
            drop = int(round(sparsity * k))
            idx = torch.rand(n, k, generator=g).argsort(dim=1)[:, :drop]
            w.scatter_(1, idx, 0)
        dense.append(w)
        packed.append(pack(w))
    return dense, packed


def copies_for(n: int, k: int, residency: str) -> int:
    return max(2, -(-DRAM_BYTES // (n * k * 2))) if residency == "dram" else 1


def bench_case(dense, packed, m, sparsity, threads, residency, repeats, kernel, dense32=None):
    n, k = dense[0].shape
    copies = len(dense)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    x32 = x.float()
    torch.set_num_threads(threads)
    state = {"i": 0}

    def run_torch():
        i = state["i"] = (state["i"] + 1) % copies
        F.linear(x, dense[i])

    def run_torch32():
        i = state["i"] = (state["i"] + 1) % copies
        F.linear(x32, dense32[i])

    def run_ours():
        i = state["i"] = (state["i"] + 1) % copies
        packed_linear(x, packed[i], kernel=kernel)

    # Each timing covers a full cycle over the copies (so every weight is read from
    # DRAM once per repeat); torch and ours alternate to see the same machine state.
    fns = {"torch": run_torch, "ours": run_ours}
    if dense32 is not None:  # torch fp32: the fast torch path on CPUs without bf16 FMA
        fns["torch32"] = run_torch32
    for fn in fns.values():
        for _ in range(copies):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(median_time_us(fn, 1, copies))
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    t_torch, t_ours = med["torch"], med["ours"]
    spreads = {name: spread(t) for name, t in times.items()}
    flags = [f for name, sp in spreads.items() for f in spread_flags(name, sp, "us")]
    nbytes = packed[0].nbytes
    extra = {}
    if dense32 is not None:
        extra = {
            "torch_fp32_us": med["torch32"],
            "speedup_vs_best_torch": min(med["torch32"], t_torch) / t_ours,
        }
    return {
        **extra,
        "shape": [n, k],
        "m": m,
        "sparsity": sparsity,
        "threads": threads,
        "residency": residency,
        "storage": packed[0].storage,
        "torch_us": t_torch,
        "sparamx_us": t_ours,
        "speedup": t_torch / t_ours,
        "gbps": nbytes / t_ours / 1e3,
        "torch_gbps": n * k * 2 / t_torch / 1e3,
        "packed_mb": nbytes / 1e6,
        "torch_us_min": spreads["torch"]["min"],
        "torch_us_max": spreads["torch"]["max"],
        "sparamx_us_min": spreads["ours"]["min"],
        "sparamx_us_max": spreads["ours"]["max"],
        "kernel": kernel or _kernel_for(m),
        "flags": flags,
        "flag": "!" if flags else "",
    }


def _kernel_for(m: int) -> str:
    from sparamx import kernel_info

    info = kernel_info()
    return info["decode"] if m <= info["decode_max_rows"] else info["prefill"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm,llama", help="smollm, llama or NxK list")
    ap.add_argument("--m", default="1,4,16,256")
    ap.add_argument("--sparsity", default="0,0.5,0.7,0.9")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--residency", default="cache,dram")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--kernel", default=None, help="force amx|avx512|portable|amx_emulated")
    ap.add_argument("--json", default=None, help="write records to this file")
    ap.add_argument(
        "--fp32",
        action="store_true",
        help="also time torch fp32 F.linear (fp32 weights and input) and report ours against "
        "the faster of torch bf16 and fp32 (on CPUs without a bf16 dot product fp32 is faster)",
    )
    args = ap.parse_args(argv)

    shapes = []
    for s in args.shapes.split(","):
        if s in SHAPES:
            shapes += SHAPES[s]
        else:
            n, k = s.lower().split("x")
            shapes.append((int(n), int(k)))
    ms = [int(v) for v in args.m.split(",")]
    sps = [float(v) for v in args.sparsity.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    bw = {t: read_bandwidth_gbps(t) for t in threads}
    print(
        "measured read bandwidth: "
        + ", ".join(f"{t} thread(s) {v:.1f} GB/s" for t, v in bw.items())
    )
    rows = []
    for residency in args.residency.split(","):
        for n, k in shapes:
            for sp in sps:  # weights are made (and packed) once per shape and sparsity
                dense, packed = make_weights(n, k, sp, copies_for(n, k, residency))
                dense32 = [w.float() for w in dense] if args.fp32 else None
                for m in ms:
                    for t in threads:
                        r = bench_case(
                            dense, packed, m, sp, t, residency, args.repeats, args.kernel, dense32
                        )
                        r["bw_frac"] = r["gbps"] / bw[t]
                        rows.append(r)
                        cols = COLUMNS + (FP32_COLUMNS if args.fp32 else []) + FLAG_COLUMNS
                        print_table([r], cols) if len(rows) == 1 else print_row(r, cols)
                del dense, packed, dense32
    # The torch baseline losing speed with more threads means a disturbed measurement.
    thread_scaling_flags(
        rows,
        key=lambda r: (r["residency"], tuple(r["shape"]), r["m"], r["sparsity"]),
        rate="torch_gbps",
        what="torch baseline",
    )
    for r in rows:
        r["flag"] = "!" if r["flags"] else ""
    columns = COLUMNS + (FP32_COLUMNS if args.fp32 else []) + FLAG_COLUMNS
    print()
    print_table(rows, columns)
    print_flags(
        rows,
        lambda r: (
            f"{r['shape'][0]}x{r['shape'][1]} M={r['m']} "
            f"sp={r['sparsity']} {r['threads']} thr {r['residency']}"
        ),
    )
    if args.json:
        env = environment()
        write_json(
            args.json, {"env": env, "environment": env, "bandwidth_gbps": bw, "records": rows}
        )


COLUMNS = [
    ("residency", "res", "s"),
    ("shape", "N x K", ""),
    ("m", "M", "d"),
    ("sparsity", "sp", ".2f"),
    ("threads", "thr", "d"),
    ("storage", "storage", "s"),
    ("torch_us", "torch us", ".1f"),
    ("sparamx_us", "ours us", ".1f"),
    ("speedup", "x", ".2f"),
    ("torch_gbps", "torch GB/s", ".1f"),
    ("gbps", "ours GB/s", ".1f"),
    ("bw_frac", "of BW", ".0%"),
]
FP32_COLUMNS = [
    ("torch_fp32_us", "torch32 us", ".1f"),
    ("speedup_vs_best_torch", "x best", ".2f"),
]
FLAG_COLUMNS = [
    ("torch_us_min", "torch min", ".1f"),
    ("torch_us_max", "torch max", ".1f"),
    ("sparamx_us_min", "ours min", ".1f"),
    ("sparamx_us_max", "ours max", ".1f"),
    ("flag", "!", "s"),
]


def print_row(r, columns):
    vals = []
    for key, _head, f in columns:
        v = r[key]
        s = "x".join(map(str, v)) if isinstance(v, list) else format(v, f)
        vals.append(s)
    print("  ".join(vals), flush=True)


if __name__ == "__main__":
    main()
