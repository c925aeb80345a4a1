"""Stage ``prune``: prune the dense model in memory (``prune/weights.safetensors`` and the
per-layer ``layers.json``); a streaming run only records the recipe (pack prunes)."""

from __future__ import annotations

import logging

from ..artifact import atomic_write_json
from ..models import parse_dtype
from .config import needs_calibration, prune_recipe
from .runstate import StageResult

log = logging.getLogger("sparamx.pipeline")


def run_stage(pipe) -> StageResult:
    from safetensors.torch import load_file, save_file

    import pruning

    p = pipe.cfg.prune
    if pipe.streaming:
        # Pruning happens inside the pack stage, layer by layer; this records the
        # recipe (and, with calibration, the compute dtype of its forwards) so that a
        # change of it re-runs pack (through this output's hash).
        plan = {"streaming": True, "prune": prune_recipe(p)}
        if needs_calibration(p):
            plan["compute_dtype"] = pipe.compute.resolved
        atomic_write_json(pipe.path("prune", "plan.json"), plan)
        return StageResult(
            ["prune/plan.json"],
            f"{p.method} {p.sparsity:.0%}: streamed with pack, one layer at a time",
        )
    # Calibration statistics and the layer forwards run in the compute dtype.
    model, tok = pipe.dense_model()
    ids_path = pipe.path("calibrate", "ids.safetensors")
    calib = load_file(ids_path)["input_ids"] if needs_calibration(p) else None
    res = pruning.prune(
        model,
        p.method,
        p.sparsity,
        tokenizer=tok,
        calibration=calib,
        granularity=p.granularity,
        allocation=allocation(p),
        skip=p.skip,
        batch_size=p.calibration.batch_size,
        include=p.include,
        percdamp=p.sparsegpt.percdamp,
        block_size=p.sparsegpt.block_size,
    )
    log.info("per-layer sparsity:\n%s", res.table())
    names = [s["name"] for s in res.stats]
    # Stored in model.dtype: the values are that dtype's (loaded so, masked in the
    # compute dtype), so this is exact and an fp32 compute does not double the file;
    # SparseGPT's updated weights are rounded to it here, the values that get packed.
    store = parse_dtype(pipe.cfg.model.dtype)
    weights = {n: model.get_submodule(n).weight.detach().to(store).contiguous() for n in names}
    tmp = pipe.path("prune", ".weights.part")
    save_file(weights, str(tmp))
    tmp.replace(pipe.path("prune", "weights.safetensors"))
    atomic_write_json(
        pipe.path("prune", "layers.json"),
        {**res.to_dict(), "compute_dtype": str(model.dtype).removeprefix("torch.")},
    )
    total = sum(s["shape"][0] * s["shape"][1] for s in res.stats)
    nnz = sum(s["nnz"] for s in res.stats)
    return StageResult(
        ["prune/weights.safetensors", "prune/layers.json"],
        f"{p.method} {p.sparsity:.0%} ({p.granularity}) on {len(names)} "
        f"linears in {res.seconds:.0f} s; overall sparsity "
        f"{1 - nnz / total:.1%}",
    )


def allocation(p):
    """The prune section's allocation as :func:`pruning.prune` takes it."""
    from pruning import OWL

    return OWL(p.owl.lambda_, p.owl.m) if p.allocation == "owl" else "uniform"
