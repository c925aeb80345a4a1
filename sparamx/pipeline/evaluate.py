"""Stages ``eval`` (dense and masked-dense models) and ``eval-packed`` (the packed
artifact, and with a KV setting its decode-path perplexity): lm-eval through
:mod:`eval`, results in ``eval/*.json`` and ``eval-packed/*.json``."""

from __future__ import annotations

import logging
from pathlib import Path

from ..artifact import atomic_write_json
from .pack import storage_counts, storage_line
from .runstate import StageResult

log = logging.getLogger("sparamx.pipeline")


def run_stage(pipe) -> StageResult:
    if not pipe.cfg.eval.tasks:
        return skip(pipe, "eval", "no eval.tasks")
    if pipe.streaming:
        # Both evaluations need the whole dense model in RAM, which streaming exists
        # to avoid; eval-packed evaluates the (memory-mapped) packed model instead.
        return skip(pipe, "eval", "streaming run: dense and masked-dense models not loaded")
    dense = evaluate(pipe, *pipe.dense_model(), pipe.path("eval", "dense.json"), "dense")
    pruned = evaluate(pipe, *pipe.pruned_model(), pipe.path("eval", "pruned.json"), "pruned")
    return StageResult(
        ["eval/dense.json", "eval/pruned.json"],
        f"dense {metric_line(dense)} | pruned {metric_line(pruned)}",
    )


def run_packed_stage(pipe) -> StageResult:
    from ..artifact import load

    if not pipe.cfg.eval.tasks:
        return skip(pipe, "eval-packed", "no eval.tasks")

    # Packed weights stay bf16; norms, embeddings, attention and activations run in
    # the compute dtype (fp32 where bf16 arithmetic is slow; see set_activation_dtype).
    model, tok = load(pipe.path("pack", "artifact"), dtype=pipe.compute_dtype)
    layers = model.sparamx_manifest["layers"]
    # The storage goes with the numbers: an int8 artifact's accuracy is not a bf16 one's.
    meta = {"storage": pipe.cfg.pack.storage, "storage_layers": storage_counts(layers)}
    res = evaluate(pipe, model, tok, pipe.path("eval-packed", "packed.json"), "packed", meta)
    outputs = ["eval-packed/packed.json"]
    summary = f"packed ({storage_line(layers)}) {metric_line(res)}"
    kvc = pipe.cfg.kv
    if kvc.method != "none":
        # lm-eval's loglikelihood tasks run prefill only (dense): the sparse KV cache is
        # measured on the decode path, text fed token by token through it.
        from eval.decode_ppl import run as decode_ppl

        ppl = decode_ppl(
            model,
            tok,
            (kvc.method,),
            kvc.k_sparsity,
            kvc.v_sparsity,
            kvc.recent_window,
            sink_tokens=kvc.sink_tokens,
            mask_tokens=kvc.mask_tokens,
            k_fill=kvc.k_fill,
        )
        atomic_write_json(pipe.path("eval-packed", "kv_decode_ppl.json"), ppl)
        outputs.append("eval-packed/kv_decode_ppl.json")
        r = ppl["results"]
        summary += (
            f"; decode-path ppl {kvc.method} KV {r[kvc.method]['ppl']:.3f} vs dense cache "
            f"{r['none']['ppl']:.3f}"
        )
    return StageResult(outputs, summary)


def evaluate(pipe, model, tok, out: Path, label: str, meta: dict | None = None) -> dict:
    import eval as sx_eval

    e = pipe.cfg.eval
    res = sx_eval.evaluate(model, tok, e.tasks, limit=e.limit, batch_size=e.batch_size)
    res["meta"].update(meta or {})
    sx_eval.write_json(out, res)
    log.info("%s: %s", label, metric_line(res))
    return res


def skip(pipe, stage: str, reason: str) -> StageResult:
    atomic_write_json(pipe.path(stage, "skipped.json"), {"skipped": True, "reason": reason})
    return StageResult([f"{stage}/skipped.json"], f"skipped: {reason}")


def metric_line(res: dict) -> str:
    """The headline metrics of the requested tasks (group totals, not their subtasks)."""
    parts = []
    requested = res.get("meta", {}).get("tasks") or list(res.get("results", {}))
    for task, metrics in res.get("results", {}).items():
        if task not in requested:
            continue
        for key in ("word_perplexity", "acc"):
            if metrics.get(key) is not None:
                parts.append(f"{task} {key}={metrics[key]:.4g}")
    return ", ".join(parts) or "no metrics"
