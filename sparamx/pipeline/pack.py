"""Stage ``pack``: swap the pruned linears for packed ones and save the artifact
(``pack/artifact``); a streaming run prunes and packs layer by layer
(:func:`sparamx.pipeline.streaming.stream_prune_pack`)."""

from __future__ import annotations

from dataclasses import asdict

from ..artifact import atomic_write_json
from .config import needs_calibration, prune_recipe
from .prune import allocation
from .runstate import StageResult


def run_stage(pipe) -> StageResult:
    import json
    import shutil

    from ..artifact import save
    from ..layers import swap_linears

    pk, p = pipe.cfg.pack, pipe.cfg.prune
    if pipe.streaming:
        return _run_streaming(pipe)
    # In model.dtype, not the compute dtype: the artifact's dense tensors (norms,
    # embeddings) are stored as loaded (bf16 by default), like its packed weights.
    model, tok = pipe.pruned_model(compute=False)
    names = swap_linears(model, include=pk.include, exclude=pk.exclude, storage=pk.storage)
    src = json.loads(pipe.path("load", "source.json").read_text())
    src.pop("config", None)
    evals = {
        v: json.loads(pipe.path("eval", f"{v}.json").read_text())["results"]
        for v in ("dense", "pruned")
        if pipe.path("eval", f"{v}.json").is_file()
    }
    art = pipe.path("pack", "artifact")
    if art.exists():
        shutil.rmtree(art)
    save(
        model,
        tok,
        art,
        source=src,
        recipe=prune_recipe(p),
        kv=asdict(pipe.cfg.kv) if pipe.cfg.kv.method != "none" else None,
        eval_summary=evals,
        max_shard_bytes=int(pk.max_shard_gb * (1 << 30)),
    )
    man = json.loads((art / "sparamx.json").read_text())
    t = man["totals"]
    return StageResult(
        ["pack/artifact"],
        f"{len(names)} linears packed as {pk.storage} ({storage_line(man['layers'])}): "
        f"{t['packed_bytes'] / 1e6:.1f} MB vs {t['dense_bytes'] / 1e6:.1f} MB dense bf16",
    )


def storage_counts(layers: list[dict]) -> dict[str, int]:
    """{storage: number of linears} over manifest layer records, in the format's order."""
    from ..format import STORAGES

    found = [lay["storage"] for lay in layers]
    return {s: found.count(s) for s in STORAGES if s in found}


def storage_line(layers: list[dict]) -> str:
    """``"209 bitmap-int8, 1 dense-int8"``: what the layers were packed as."""
    return ", ".join(f"{n} {s}" for s, n in storage_counts(layers).items()) or "none"


def _run_streaming(pipe) -> StageResult:
    import json
    import shutil

    from safetensors.torch import load_file

    from .streaming import stream_prune_pack

    pk, p = pipe.cfg.pack, pipe.cfg.prune
    calib, calib_info = None, None
    if needs_calibration(p):
        calib = load_file(pipe.path("calibrate", "ids.safetensors"))["input_ids"]
        calib_info = json.loads(pipe.path("calibrate", "calibration.json").read_text())
    src = json.loads(pipe.path("load", "source.json").read_text())
    src.pop("config", None)
    art = pipe.path("pack", "artifact")
    if art.exists():
        shutil.rmtree(art)
    res = stream_prune_pack(
        pipe.source_dir(),
        art,
        method=p.method,
        sparsity=p.sparsity,
        granularity=p.granularity,
        allocation=allocation(p),
        percdamp=p.sparsegpt.percdamp,
        block_size=p.sparsegpt.block_size,
        skip=p.skip,
        prune_include=p.include,
        calibration_ids=calib,
        calibration_info=calib_info,
        include=pk.include,
        exclude=pk.exclude,
        storage=pk.storage,
        dtype=pipe.cfg.model.dtype,
        compute_dtype=pipe.compute.resolved,
        max_shard_bytes=int(pk.max_shard_gb * (1 << 30)),
        batch_size=p.calibration.batch_size,
        source_record=src,
        recipe=prune_recipe(p),
    )
    layers = {
        "method": p.method,
        "sparsity": p.sparsity,
        "granularity": p.granularity,
        "calibration": calib_info,
        "seconds": res.seconds,
        "allocation": res.allocation,
        "streaming": {"peak_rss_mb": res.peak_rss_mb, **res.timings},
        "layers": res.stats,
    }
    atomic_write_json(pipe.path("pack", "layers.json"), layers)
    packed = sum(lay["bytes"] for lay in res.layers)
    dense = sum(2 * lay["shape"][0] * lay["shape"][1] for lay in res.layers)
    nnz = sum(s["nnz"] for s in res.stats)
    total = sum(s["shape"][0] * s["shape"][1] for s in res.stats)
    return StageResult(
        ["pack/artifact", "pack/layers.json"],
        f"streamed: {p.method} {p.sparsity:.0%} on {len(res.stats)} linears (overall "
        f"{1 - nnz / max(total, 1):.1%}), {len(res.layers)} packed "
        f"as {pk.storage} ({storage_line(res.layers)}): "
        f"{packed / 1e6:.1f} MB vs {dense / 1e6:.1f} MB dense bf16, in {res.seconds:.0f} s, "
        f"peak RSS {res.peak_rss_mb / 1024:.2f} GiB",
    )
