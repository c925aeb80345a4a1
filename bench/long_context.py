"""Lean decode at a long prompt: the dense static cache against the sparse KV cache,
same process, modes alternating, after one untimed (compiling) call each.

    python bench/long_context.py ARTIFACT --context 2048 8192 --threads 1 2 --json out.json
    python bench/long_context.py ARTIFACT --modes exact fast --context 2048

Modes (``--modes``): ``exact`` (dense cache, transformers' SDPA), ``fast`` (dense
cache, our decode attention kernel), ``kv`` (sparse KV cache of ``--kv``, bitwise
``model.generate`` with that cache), ``kv-fast`` (the same, norms fused by inductor as
in ``fast``). ``fast`` against ``kv-fast`` isolates the cache: same kernel family, same
graph otherwise. The prompt is the first ``context`` tokens of real English text
(``sparamx.pipeline.bench.context_prompt``). Reports per (context, threads, mode) the median
over ``--repeats`` of the mean ms per decoded token, its spread, tokens/s and the KV
cache bytes after the last token (sparse: compressed + dense window).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_flags, print_table, write_json  # noqa: E402

import sparamx  # noqa: E402
from sparamx.pipeline.bench import context_prompt, spread, spread_flags, time_generate_lean  # noqa: E402

MODES = {  # name: (attention, sparse KV)
    "exact": ("exact", False),
    "fast": ("fast", False),
    "kv": ("exact", True),
    "kv-fast": ("fast", True),
}
DEFAULT_KV = {"method": "magnitude", "k_sparsity": 0.5, "v_sparsity": 0.5}


def one_run(model, tok, ids: torch.Tensor, new_tokens: int, mode: str, kv: dict) -> dict:
    attention, sparse = MODES[mode]
    return time_generate_lean(
        model, tok, ids, new_tokens, attention=attention, kv=kv if sparse else False
    )


def measure(model, tok, ids, args, mode_names) -> list[dict]:
    """One (context, threads) cell: warm every mode, then alternate the timed runs."""
    runs: dict[str, list[dict]] = {m: [] for m in mode_names}
    for mode in mode_names:
        one_run(model, tok, ids, args.new_tokens, mode, args.kv)  # compile and warm
    for _ in range(args.repeats):
        for mode in mode_names:
            runs[mode].append(one_run(model, tok, ids, args.new_tokens, mode, args.kv))
    rows = []
    for mode in mode_names:
        ms = spread(r["ms_per_token"] for r in runs[mode])
        last = runs[mode][-1]
        rows.append(
            {
                "context": ids.shape[1],
                "threads": torch.get_num_threads(),
                "mode": mode,
                "new_tokens": args.new_tokens,
                "ms_per_token": ms["median"],
                "tokens_per_s": 1e3 / ms["median"],
                "spread": ms,
                "kv": last["kv"],
                "kv_sparsity": 0.0 if not last["kv"] else last["kv"]["k_sparsity"],
                "kv_bytes": last["kv_bytes"],
                "kv_dense_bf16_bytes": last["kv_dense_bytes"],
                "recompiled_while_timed": any(r["compile_s"] for r in runs[mode]),
                "flags": spread_flags(f"{mode} ms/token", ms),
            }
        )
    base = {r["mode"]: r["ms_per_token"] for r in rows}
    for r in rows:  # speed-up of the sparse cache over the dense one of the same attention
        dense = base.get({"kv": "exact", "kv-fast": "fast"}.get(r["mode"], ""))
        r["speedup_vs_dense"] = dense / r["ms_per_token"] if dense else None
        r["flag"] = "!" if r["flags"] else ""
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="packed artifact directory")
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="prompt tokens")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fast", "kv-fast"])
    p.add_argument("--kv", type=json.loads, default=DEFAULT_KV, help="kv.KVSettings (JSON)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype (auto: float32 where the CPU has no fast bf16 matmul)",
    )
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)

    from sparamx.cpu import resolve_compute_dtype

    dtype = resolve_compute_dtype(args.dtype).resolved
    model, tok = sparamx.load(args.artifact, kv={}, dtype=dtype)
    rows = []
    for context in args.context:
        ids = context_prompt(tok, context)
        for threads in args.threads:
            torch.set_num_threads(threads)
            rows += measure(model, tok, ids, args, args.modes)
    print_table(
        rows,
        [
            ("context", "ctx", "d"),
            ("threads", "thr", "d"),
            ("mode", "mode", "s"),
            ("ms_per_token", "ms/token", ".2f"),
            ("tokens_per_s", "tokens/s", ".1f"),
            ("speedup_vs_dense", "x dense", ".2f"),
            ("kv_bytes", "KV bytes", "d"),
            ("flag", "!", "s"),
        ],
    )
    print_flags(rows, lambda r: f"context {r['context']}, {r['threads']} thr, {r['mode']}")
    if args.json:
        env = environment()
        payload = {
            "env": env,
            "environment": env,
            "artifact": args.artifact,
            "compute_dtype": dtype,
            "records": rows,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
