"""Pruning methods compared on one model: held-out perplexity, wall time and peak RSS.

    python bench/pruning_methods.py [--model smollm2-135m] [--limit 60] [--threads 1] \\
        [--cases dense,magnitude@0.5,...] [--out bench/results/NAME.json]

Every case uses the same calibration set (the pipeline's default: offline Wikipedia,
32 x 256 tokens, seed 0) and is evaluated on text no method saw: lm-eval word
perplexity of ``lee_news_ppl`` (news articles), through :func:`eval.evaluate`, the
pipeline's eval path. As in the pipeline, the model is loaded in bf16, pruned and
evaluated in fp32 (``sparamx.cpu``: no fast bf16 matmul on AVX2-only CPUs; ``--dtype``
overrides), and the pruned weights are rounded to bf16, the values that get packed.

A case is ``method[+owl]@sparsity``. Each runs in a fresh process, so that its peak RSS
(taken right after pruning, before the evaluation) is its own; the wall time is the
``pruning.prune`` call (calibration capture, OWL pass, all layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, print_table, write_json  # noqa: E402

DEFAULT_CASES = (
    "dense",
    "magnitude@0.5",
    "wanda@0.5",
    "sparsegpt@0.5",
    "wanda@0.7",
    "wanda+owl@0.7",
    "sparsegpt@0.7",
    "sparsegpt+owl@0.7",
)


def parse_case(case: str) -> tuple[str, str, float]:
    """ "sparsegpt+owl@0.7" -> ("sparsegpt", "owl", 0.7); "dense" -> ("dense", "uniform", 0)."""
    if case == "dense":
        return "dense", "uniform", 0.0
    name, _, sparsity = case.partition("@")
    method, _, alloc = name.partition("+")
    return method, alloc or "uniform", float(sparsity)


def run_case(case: str, model_name: str, limit: int, threads: int, dtype: str) -> dict:
    """Prune (unless dense) and evaluate one case in this process."""
    import time

    import torch

    import eval as sx_eval
    import pruning
    from pruning.calibration import Calibration, load_calibration
    from sparamx.models import load_model, parse_dtype
    from sparamx.pipeline.bench import peak_rss_mb

    torch.set_num_threads(threads)
    method, alloc, sparsity = parse_case(case)
    model, tok = load_model(model_name, dtype="bfloat16")
    model.to(parse_dtype(dtype))
    row = {"case": case, "method": method, "allocation": alloc, "sparsity": sparsity}
    if method != "dense":
        calib = load_calibration(tok, Calibration())
        start = time.perf_counter()
        res = pruning.prune(
            model, method, sparsity, tokenizer=tok, calibration=calib, allocation=alloc
        )
        row["prune_s"] = time.perf_counter() - start
        row["prune_peak_rss_mb"] = peak_rss_mb()
        row["statistics_mb"] = res.statistics_mb
        with torch.no_grad():  # what the pipeline stores and packs: bf16 values
            for s in res.stats:
                w = model.get_submodule(s["name"]).weight
                w.copy_(w.to(torch.bfloat16).to(w.dtype))
        numel = sum(s["shape"][0] * s["shape"][1] for s in res.stats)
        row["realised_sparsity"] = 1 - sum(s["nnz"] for s in res.stats) / numel
        row["allocation_detail"] = res.allocation
    ev = sx_eval.evaluate(model, tok, ["lee_news_ppl"], limit=limit, batch_size=8)
    row["word_perplexity"] = ev["results"]["lee_news_ppl"]["word_perplexity"]
    row["eval_s"] = ev["meta"]["wall_time_s"]
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def ratios(rows: list[dict]) -> dict:
    """The issue's targets: SparseGPT vs Wanda at 50%, OWL+SparseGPT vs Wanda at 70%."""
    ppl = {r["case"]: r["word_perplexity"] for r in rows}
    out = {}
    if {"sparsegpt@0.5", "wanda@0.5"} <= set(ppl):
        out["sparsegpt_over_wanda_50"] = ppl["sparsegpt@0.5"] / ppl["wanda@0.5"]
    if {"sparsegpt+owl@0.7", "wanda@0.7"} <= set(ppl):
        out["owl_sparsegpt_over_wanda_70"] = ppl["sparsegpt+owl@0.7"] / ppl["wanda@0.7"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=60, help="lee_news documents evaluated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case
    args = ap.parse_args(argv)
    if args.case:
        row = run_case(args.case, args.model, args.limit, args.threads, args.dtype)
        print("RESULT " + json.dumps(row))
        return 0
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--case", case, "--model", args.model]
        cmd += ["--limit", str(args.limit), "--threads", str(args.threads), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {case} failed (exit {out.returncode})")
        rows.append(json.loads(line[-1][len("RESULT ") :]))
        r = rows[-1]
        print(
            f"{case}: ppl {r['word_perplexity']:.1f}, prune {r.get('prune_s', 0):.0f} s", flush=True
        )
    columns = [
        ("case", "case", "s"),
        ("word_perplexity", "lee ppl", ".1f"),
        ("realised_sparsity", "sparsity", ".4f"),
        ("prune_s", "prune s", ".0f"),
        ("prune_peak_rss_mb", "prune RSS MB", ".0f"),
        ("statistics_mb", "stats MB", ".1f"),
    ]
    print_table([{k: r.get(k) for k, _, _ in columns} for r in rows], columns)
    summary = ratios(rows)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    if args.out:
        payload = {
            "command": " ".join(sys.orig_argv),
            "model": args.model,
            "calibration": {"source": "wikipedia", "samples": 32, "seqlen": 256, "seed": 0},
            "eval": {"task": "lee_news_ppl", "limit": args.limit, "metric": "word_perplexity"},
            "dtype": args.dtype,
            "environment": environment(args.threads),
            "ratios": summary,
            "rows": rows,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
