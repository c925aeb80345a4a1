"""Lean decode at a long prompt: ``attention="exact"`` (transformers' SDPA over the
filled cache) against ``attention="fast"`` (our decode attention kernel), same process,
alternating, after one untimed (compiling) call each.

    python bench/long_context.py ARTIFACT --context 2048 --threads 1 2 --json out.json

The prompt is ``context`` random token ids (attention cost does not depend on the text);
reports the median over ``--repeats`` of the mean ms per decoded token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_flags, print_table, write_json  # noqa: E402

import sparamx  # noqa: E402
from sparamx.bench import spread, spread_flags, time_generate_lean  # noqa: E402

MODES = ("exact", "fast")


def ms_per_token(model, ids: torch.Tensor, new_tokens: int, attention: str) -> float:
    return time_generate_lean(model, None, ids, new_tokens, attention=attention)["ms_per_token"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="packed artifact directory")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)

    model, _ = sparamx.load(args.artifact)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=gen)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for mode in MODES:
            ms_per_token(model, ids, args.new_tokens, mode)  # compile and warm
        for _ in range(args.repeats):
            for mode in MODES:
                times[mode].append(ms_per_token(model, ids, args.new_tokens, mode))
        exact, fast = (statistics.median(times[m]) for m in MODES)
        spreads = {m: spread(times[m]) for m in MODES}
        rows.append(
            {
                "context": args.context,
                "threads": threads,
                "new_tokens": args.new_tokens,
                "exact_ms_per_token": exact,
                "fast_ms_per_token": fast,
                "speedup": exact / fast,
                "spread": spreads,
                "flags": [f for m in MODES for f in spread_flags(m, spreads[m])],
            }
        )
        rows[-1]["flag"] = "!" if rows[-1]["flags"] else ""
    print_table(
        rows,
        [
            ("context", "ctx", "d"),
            ("threads", "thr", "d"),
            ("exact_ms_per_token", "exact ms/token", ".1f"),
            ("fast_ms_per_token", "fast ms/token", ".1f"),
            ("speedup", "x", ".2f"),
            ("flag", "!", "s"),
        ],
    )
    print_flags(rows, lambda r: f"context {r['context']}, {r['threads']} thr")
    if args.json:
        env = environment()
        payload = {"env": env, "environment": env, "artifact": args.artifact, "records": rows}
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
