"""Decode-attention benchmark: one query token against a KV cache of `context` tokens.

For each head shape, context, KV sparsity and thread count, times in the same run:
  sdpa      transformers' SDPA attention function (as the modeling code calls it) on a
            dense bf16 cache [1, Hkv, n, D];
  dense     our kernel on the same dense cache (no bitmaps): the honest baseline and
            the path taken when KV sparsity is off;
  sparamx   our kernel on the pruned, packed cache (magnitude pruning; one row per
            `--mask-tokens` setting: a mask per token, or per 16 tokens, then one row
            per `--k-fill` setting: pruned key entries read as their group's mean, or
            as zero; every token compressed, no dense window).
The caches are DRAM-resident: each timed call goes to the next of several layers'
caches, cycling through more bytes than the last-level cache holds. Reports µs per
layer: the median of the repeats (each a full cycle through the layers) with their min
and max. Our dense and sparse kernels (every `--kernel` given) take turns in every
repeat, so each row's ratios are measured side by side. Also: speedups, cache memory
vs dense, GB/s of cache bytes read and its share of the DRAM read probe (measured
right before each case, with the same thread count), and the 1-minute load average
seen before each case (on a shared machine a case timed above ~1.5 is suspect; a
warning is printed).

    python bench/attention.py                               # the default table
    python bench/attention.py --heads llama --contexts 8192 --sparsity 0.5 --threads 1
    python bench/attention.py --kernel avx2 portable        # compare kernels, same run
    python bench/attention.py --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    environment,
    last_level_cache_bytes,
    print_table,
    read_bandwidth_gbps,
    write_json,
)

from sparamx import kv  # noqa: E402

HEADS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}  # query heads, KV heads, head_dim
DRAM_BYTES = max(160 << 20, 3 * last_level_cache_bytes())
KERNELS = ("auto", "avx512", "avx2", "portable")  # attention kernels (impl=; auto: the best)
BUSY_LOAD = 1.5  # 1-minute load average above which timings on 2 cores are suspect


class _Module:
    """What transformers' SDPA function reads from the attention module."""

    def __init__(self, group: int):
        self.num_key_value_groups = group
        self.is_causal = True
        self.training = False


def make_layers(
    hkv: int, d: int, n: int, sparsity: float, copies: int, mask_tokens: int, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    keep = max(1, round((1 - sparsity) * d))
    layers = []
    for _ in range(copies):
        k = torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16)
        v = torch.randn(1, hkv, n, d, generator=g).to(torch.bfloat16)
        kb, kvals = kv.prune_tokens(k, keep, None, mask_tokens, "k")
        vb, vvals = kv.prune_tokens(v, keep, None, mask_tokens, "v")
        kf = kv.group_fill(k, kb, mask_tokens) if mask_tokens > 1 else None
        layers.append({"k": k, "v": v, "kb": kb, "kv": kvals, "vb": vb, "vv": vvals, "kf": kf})
    return layers


def times_us(fns, repeats: int, inner: int) -> list[list[float]]:
    """For each of ``fns``, the mean time (µs) of ``inner`` back-to-back calls, once per
    repeat. The functions take turns in every repeat, so a slow spell of the machine hits
    them alike (compared kernels are never timed minutes apart)."""
    out = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            out[i].append((time.perf_counter_ns() - t0) / inner / 1e3)
    return out


def load1() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def impl(kernel: str) -> str | None:
    return None if kernel == "auto" else kernel


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def cycle(layers, fn):
    """A callable that runs fn on the next layer each call."""
    state = {"i": 0}

    def run():
        lay = layers[state["i"] % len(layers)]
        state["i"] += 1
        fn(lay)

    return run


def bench_case(
    name,
    heads,
    n,
    sparsities,
    threads,
    repeats,
    with_sdpa,
    masks=(1,),
    fills=("mean",),
    kernels=("auto",),
):
    hq, hkv, d = heads
    dense_bytes = 2 * hkv * n * d * 2
    copies = max(2, -(-DRAM_BYTES // dense_bytes))
    torch.set_num_threads(threads)
    load = load1()
    if load is not None and load > BUSY_LOAD:
        print(
            f"warning: load average {load:.2f} > {BUSY_LOAD} before {name} ctx={n} "
            f"thr={threads}: timings are suspect",
            file=sys.stderr,
        )
    probe = read_bandwidth_gbps(threads)
    q = torch.randn(1, hq, d).to(torch.bfloat16)
    q4 = q.unsqueeze(2)  # [1, Hq, 1, D] as transformers passes it
    empty = torch.empty(1, hkv, 0, d, dtype=torch.bfloat16)
    scale = d**-0.5
    module = _Module(hq // hkv)
    rows = []
    dense_fns = sdpa_us = None
    # sparsity 0 has no masks: one row; each other sparsity one row per mask setting
    cases = [(s, mt) for s in sparsities for mt in (masks if s > 0 else masks[:1])]
    for s, mask_tokens in cases:
        layers = make_layers(hkv, d, n, s, max(2, copies), mask_tokens)
        if dense_fns is None:  # the first case's dense caches serve every row
            if with_sdpa:
                sdpa_us = _time_sdpa(layers, module, q4, scale, max(1, repeats))
            dense_fns = {
                k: cycle(
                    layers,
                    lambda lay, k=k: kv.decode_attention(
                        q, lay["k"], None, lay["v"], None, n, empty, empty, scale, impl(k)
                    ),
                )
                for k in kernels
            }
            for f in dense_fns.values():
                f()
        for fill in fills if s > 0 and mask_tokens > 1 else (None,):
            rows += _time_sparse(
                layers,
                dense_fns,
                q,
                n,
                empty,
                scale,
                repeats,
                mask_tokens,
                fill,
                {
                    "model": name,
                    "context": n,
                    "k_sparsity": s,
                    "v_sparsity": s,
                    "threads": threads,
                    "heads": [hq, hkv, d],
                    "mask_tokens": mask_tokens,
                    "k_fill": fill,
                    "sdpa_us": sdpa_us,
                    "load1": load,
                    "probe_gbps": probe,
                },
                dense_bytes,
            )
        del layers
    return rows


def _time_sdpa(layers, module, q4, scale, rounds):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    f = cycle(
        layers,
        lambda lay: sdpa_attention_forward(module, q4, lay["k"], lay["v"], None, scaling=scale),
    )
    f()
    return statistics.median(times_us([f], rounds, inner=len(layers))[0])


def _time_sparse(layers, dense_fns, q, n, empty, scale, repeats, mt, fill, row, dense_bytes):
    """One row per kernel: our sparse kernel timed in turns with our dense kernel (every
    kernel's pair in the same repeats)."""
    use_fill = fill == "mean"

    def sparse_fn(kernel):
        return cycle(
            layers,
            lambda lay: kv.decode_attention(
                q,
                lay["kv"],
                lay["kb"],
                lay["vv"],
                lay["vb"],
                n,
                empty,
                empty,
                scale,
                impl(kernel),
                mt,
                lay["kf"] if use_fill else None,
            ),
        )

    fns = []
    for kernel, dense_fn in dense_fns.items():
        fns += [dense_fn, sparse_fn(kernel)]
        fns[-1]()
    times = times_us(fns, repeats, inner=len(layers))
    lay = layers[0]
    sparse_bytes = nbytes(
        lay["kv"], lay["kb"], lay["vv"], lay["vb"], lay["kf"] if use_fill else None
    )
    sdpa_us = row["sdpa_us"]
    out = []
    for i, kernel in enumerate(dense_fns):
        dense, ours = times[2 * i], times[2 * i + 1]
        dense_us, ours_us = statistics.median(dense), statistics.median(ours)
        out.append(
            {
                **row,
                "kernel": kernel,
                "dense_us": dense_us,
                "dense_us_min": min(dense),
                "dense_us_max": max(dense),
                "sparamx_us": ours_us,
                "sparamx_us_min": min(ours),
                "sparamx_us_max": max(ours),
                "speedup_vs_dense": dense_us / ours_us,
                "speedup_vs_sdpa": sdpa_us / ours_us if sdpa_us else None,
                "memory_ratio": sparse_bytes / dense_bytes,
                "gbps": sparse_bytes / ours_us / 1e3,
                "dense_gbps": dense_bytes / dense_us / 1e3,
                "dense_pct_probe": 100 * dense_bytes / dense_us / 1e3 / row["probe_gbps"],
                "sparse_pct_probe": 100 * sparse_bytes / ours_us / 1e3 / row["probe_gbps"],
                "sdpa_gbps": dense_bytes / sdpa_us / 1e3 if sdpa_us else None,
                "layers_cycled": len(layers),
                "repeats": repeats,
            }
        )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192, 16384])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.0, 0.5, 0.8])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median, min, max)")
    p.add_argument(
        "--kernel",
        nargs="+",
        default=["auto"],
        choices=KERNELS,
        help="attention kernels to time side by side (auto: the best this CPU has); a row each",
    )
    p.add_argument(
        "--mask-tokens",
        nargs="+",
        type=int,
        default=list(kv.MASK_TOKENS),
        choices=kv.MASK_TOKENS,
        help="tokens sharing one pruning mask (kv.mask_tokens); one row per setting",
    )
    p.add_argument(
        "--k-fill",
        nargs="+",
        default=["mean"],
        choices=kv.K_FILLS,
        help="with shared masks, what pruned key entries read as (kv.k_fill); a row each",
    )
    p.add_argument("--no-sdpa", action="store_true", help="skip torch SDPA (slow at long context)")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    for s in args.sparsity:
        if not 0 <= s < 1:
            p.error(f"--sparsity {s}: allowed 0 <= sparsity < 1")
    sparsities = sorted(set(args.sparsity))
    rows = []
    for name in args.heads:
        for n in args.contexts:
            for t in args.threads:
                sdpa = not args.no_sdpa
                new = bench_case(
                    name,
                    HEADS[name],
                    n,
                    sparsities,
                    t,
                    args.repeats,
                    sdpa,
                    args.mask_tokens,
                    args.k_fill,
                    args.kernel,
                )
                rows += new
                for r in new:  # progress; the table follows at the end
                    print(
                        f"{name} ctx={n} s={r['k_sparsity']} mask={r['mask_tokens']} "
                        f"fill={r['k_fill']} thr={t} {r['kernel']}: "
                        f"{r['sparamx_us']:.0f} us (dense {r['dense_us']:.0f}), "
                        f"load {r['load1']}",
                        file=sys.stderr,
                    )
    for r in rows:  # median (min-max) cells
        r["dense_cell"] = f"{r['dense_us']:.0f} ({r['dense_us_min']:.0f}-{r['dense_us_max']:.0f})"
        r["sparse_cell"] = (
            f"{r['sparamx_us']:.0f} ({r['sparamx_us_min']:.0f}-{r['sparamx_us_max']:.0f})"
        )
    print_table(rows, COLUMNS)
    print(
        "\nµs per layer: median (min-max) of the repeats; %bw: GB/s over the DRAM read probe "
        "measured before each case (probe column)"
    )
    if args.json:
        write_json(args.json, {"environment": environment(), "records": rows})


COLUMNS = [
    ("model", "heads", "s"),
    ("context", "ctx", "d"),
    ("k_sparsity", "kv_s", ".2f"),
    ("mask_tokens", "mask", "d"),
    ("k_fill", "k_fill", "s"),
    ("threads", "thr", "d"),
    ("kernel", "kernel", "s"),
    ("load1", "load", ".2f"),
    ("probe_gbps", "probe", ".1f"),
    ("sdpa_us", "sdpa_us", ".0f"),
    ("dense_cell", "dense_us", "s"),
    ("sparse_cell", "sparse_us", "s"),
    ("speedup_vs_dense", "x_dense", ".2f"),
    ("speedup_vs_sdpa", "x_sdpa", ".1f"),
    ("memory_ratio", "mem", ".3f"),
    ("dense_gbps", "dense_GB/s", ".1f"),
    ("dense_pct_probe", "%bw", ".0f"),
    ("gbps", "sparse_GB/s", ".1f"),
    ("sparse_pct_probe", "%bw", ".0f"),
]

if __name__ == "__main__":
    main()
