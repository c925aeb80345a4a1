"""End-to-end decode at Llama-3-8B shapes: stock transformers bf16 vs packed artifacts,
each (model, threads) in a fresh process through ``model.generate`` (sparamx.pipeline.bench).

    python -m sparamx.tools.random_model --layers 32 --out /scratch/llama3-8b-32l
    python -m sparamx.pipeline.streaming /scratch/llama3-8b-32l /scratch/art-50 --sparsity 0.5
    python bench/decode_8b.py --stock /scratch/llama3-8b-32l --artifact /scratch/art-50 \\
        --threads 1 2 --new-tokens 8 --json bench_8b.json

Prints ms per token, tokens/s, the speed-up over stock at the same thread count, and the
fraction of memory bandwidth reached: bytes of linear weights read per token / time per
token, over the DRAM read bandwidth measured in the same process. Each record carries
``environment`` and ``flags`` (``sparamx.pipeline.bench``): repeats that disagree by more than 20%,
or a stock baseline slower with more threads, are marked ``!`` and listed as WARNINGs.
``--dtype``: the compute dtype (``auto``: fp32 on CPUs without a fast bf16 matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparamx.pipeline.bench import bench_subprocess, machine_record, thread_scaling_flags  # noqa: E402

PROMPT = "The history of the printing press begins"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stock", required=True, help="dense HF model directory")
    ap.add_argument("--artifact", action="append", default=[], help="packed artifact dir")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    args = ap.parse_args(argv)
    rows = []
    for threads in args.threads:
        for kind, src in [("stock", args.stock)] + [("sparse", a) for a in args.artifact]:
            print(f"running {kind} {src} at {threads} thread(s) ...", file=sys.stderr, flush=True)
            rec = bench_subprocess(
                kind, src, threads, [PROMPT], args.new_tokens, args.repeats, args.dtype
            )
            rec["sparsity"] = _sparsity(src) if kind == "sparse" else 0.0
            rows.append(rec)
            if args.json:  # partial results survive an interrupted run
                _write(args.json, rows)
    thread_scaling_flags(
        [r for r in rows if r["model"] == "stock"], key=lambda r: r["source"], what="stock"
    )
    for r in rows:
        base = next(s for s in rows if s["model"] == "stock" and s["threads"] == r["threads"])
        r["speedup_vs_stock"] = base["ms_per_token"] / r["ms_per_token"]
        if base.get("flags") and base is not r:
            r.setdefault("flags", []).append("speed-up against a flagged stock measurement")
    header = (
        f"{'model':>6} {'sparsity':>8} {'thr':>3} {'ms/token':>9} {'tok/s':>6} {'x stock':>7} "
        f"{'GB/token':>8} {'GB/s':>5} {'DRAM GB/s':>9} {'of DRAM':>7} {'RSS GB':>6} "
        f"{'ms min':>7} {'ms max':>7} !"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:>6} {r['sparsity']:>8.2f} {r['threads']:>3} {r['ms_per_token']:>9.1f} "
            f"{r['tokens_per_s']:>6.2f} {r['speedup_vs_stock']:>7.2f} "
            f"{r['weight_bytes_per_token'] / 1e9:>8.2f} {r['weight_gb_per_s']:>5.1f} "
            f"{r['dram_read_gbps']:>9.1f} {r['bandwidth_fraction']:>7.0%} "
            f"{r['peak_rss_mb'] / 1024:>6.1f} {r['ms_per_token_spread']['min']:>7.1f} "
            f"{r['ms_per_token_spread']['max']:>7.1f} {'!' if r.get('flags') else ''}"
        )
    for r in rows:
        for f in r.get("flags", []):
            print(f"WARNING: {r['model']} {r['sparsity']:.2f} {r['threads']} thr: {f}")
    if args.json:
        _write(args.json, rows)
    return 0


def _sparsity(artifact: str) -> float:
    """Overall sparsity of the bitmap-packed linears, from the manifest."""
    layers = json.loads((Path(artifact) / "sparamx.json").read_text())["layers"]
    sparse = [lay for lay in layers if lay["storage"] == "bitmap-bf16"]
    numel = sum(lay["shape"][0] * lay["shape"][1] for lay in sparse)
    return 1 - sum(lay["nnz"] for lay in sparse) / numel if numel else 0.0


def _write(path: str, rows: list[dict]) -> None:
    tmp = Path(path).with_suffix(".part")
    payload = {"records": rows, "machine": os.uname().nodename, "environment": machine_record()}
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
