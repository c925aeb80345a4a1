"""Decode-path perplexity: text fed token by token through the KV cache, so that a
sparse KV cache is read exactly as in generation (lm-eval's loglikelihood tasks run
prefill only, which stays dense). Compares our dense cache with the sparse cache.

    python -m eval.decode_ppl smollm2-135m --k-sparsity 0.5 --v-sparsity 0.5
    python -m eval.decode_ppl runs/NAME/pack/artifact --methods magnitude wanda --json out.json

The text is the start of the ``lee_news_ppl`` articles (our offline news text),
concatenated into one stream of ``--tokens`` tokens; the first ``--prefill`` tokens go
in as a prefill and are not scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def news_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """``[1, n_tokens]`` ids of the lee news articles, in order, joined by blank lines."""
    from .data import LEE_FILE, prepare

    root = prepare().root
    ids: list[int] = []
    with open(root / LEE_FILE, encoding="utf-8") as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"] + "\n\n").input_ids
            if len(ids) >= n_tokens:
                break
    if len(ids) < n_tokens:
        raise ValueError(f"the news text has only {len(ids)} tokens; asked for {n_tokens}")
    return torch.tensor([ids[:n_tokens]])


def run(
    model,
    tokenizer,
    methods=("magnitude", "wanda"),
    k_sparsity: float = 0.5,
    v_sparsity: float = 0.5,
    recent_window: int = 64,
    tokens: int = 768,
    prefill: int = 64,
    **settings,
) -> dict:
    """Perplexity with our dense cache (``method none``) and each sparse method; further
    ``settings`` (``sink_tokens``, ``mask_tokens``, ...) go to ``kv.KVSettings``."""
    from sparamx import kv

    ids = news_tokens(tokenizer, tokens)
    old_impl = model.config._attn_implementation
    results = {}
    try:
        for method in ("none", *methods):
            s = kv.KVSettings(
                method,
                0.0 if method == "none" else k_sparsity,
                0.0 if method == "none" else v_sparsity,
                recent_window,
                **settings,
            )
            kv.enable_sparse_kv(model, s)
            cache = kv.new_cache(model)
            t0 = time.perf_counter()
            res = kv.decode_perplexity(model, ids, cache, prefill=prefill)
            res["seconds"] = time.perf_counter() - t0
            res["settings"] = s.to_dict()
            res["cache_bytes"] = cache.nbytes()
            res["dense_cache_bytes"] = cache.dense_nbytes()
            results[method] = res
            log.info("decode ppl %s: %.3f (%.0f s)", method, res["ppl"], res["seconds"])
    finally:
        kv.disable_sparse_kv(model, old_impl)
    base = results["none"]["ppl"]
    for m in methods:
        results[m]["ppl_ratio_vs_dense"] = results[m]["ppl"] / base
        results[m]["memory_ratio"] = results[m]["cache_bytes"] / results[m]["dense_cache_bytes"]
    return {"tokens": tokens, "prefill": prefill, "results": results}


def main(argv=None) -> int:
    from sparamx.kv import K_FILLS, KVSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", help="artifact directory, HF dir/hub id, or smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda"])
    ap.add_argument("--k-sparsity", type=float, default=0.5)
    ap.add_argument("--v-sparsity", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=64, help="recent_window (tokens kept dense)")
    ap.add_argument("--sinks", type=int, default=32, help="sink_tokens (first tokens kept dense)")
    ap.add_argument(
        "--mask-tokens",
        type=int,
        default=KVSettings().mask_tokens,
        help="tokens sharing one pruning mask: 16 or 1",
    )
    ap.add_argument(
        "--k-fill",
        default=KVSettings().k_fill,
        choices=K_FILLS,
        help="shared masks: pruned key entries read as their group's mean, or as zero",
    )
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if (Path(args.model) / "sparamx.json").is_file():
        from sparamx.artifact import load

        model, tok = load(args.model, kv={})
    else:
        from sparamx.models import load_model

        model, tok = load_model(args.model, dtype="bfloat16")
    out = run(
        model.eval(),
        tok,
        args.methods,
        args.k_sparsity,
        args.v_sparsity,
        args.window,
        args.tokens,
        args.prefill,
        sink_tokens=args.sinks,
        mask_tokens=args.mask_tokens,
        k_fill=args.k_fill,
    )
    out["model"] = args.model
    print(f"decode-path perplexity, {args.tokens} tokens ({args.prefill} prefill, not scored)")
    for m, r in out["results"].items():
        extra = (
            f"  x{r['ppl_ratio_vs_dense']:.4f} vs dense, memory x{r['memory_ratio']:.3f}"
            if m != "none"
            else ""
        )
        print(f"  {m:10s} ppl {r['ppl']:.3f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
