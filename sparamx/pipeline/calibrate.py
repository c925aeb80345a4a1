"""Stage ``calibrate``: the calibration token ids (``calibrate/ids.safetensors``) for the
methods that run calibration forwards; magnitude records that it needs none."""

from __future__ import annotations

from dataclasses import asdict

from ..artifact import atomic_write_json
from .config import needs_calibration
from .runstate import StageResult


def run_stage(pipe) -> StageResult:
    from safetensors.torch import save_file

    from pruning.calibration import Calibration, load_calibration

    c = pipe.cfg.prune.calibration
    out = pipe.path("calibrate", "calibration.json")
    if not needs_calibration(pipe.cfg.prune):
        atomic_write_json(out, {"needed": False, "reason": "magnitude uses no data"})
        return StageResult(["calibrate/calibration.json"], "not needed for magnitude")
    ids = load_calibration(pipe.tokenizer(), Calibration(c.source, c.samples, c.seqlen, c.seed))
    tmp = pipe.path("calibrate", ".ids.part")
    save_file({"input_ids": ids.contiguous()}, str(tmp))
    tmp.replace(pipe.path("calibrate", "ids.safetensors"))
    atomic_write_json(out, {"needed": True, **asdict(c), "shape": list(ids.shape)})
    return StageResult(
        ["calibrate/calibration.json", "calibrate/ids.safetensors"],
        f"{c.source}: {ids.shape[0]} x {ids.shape[1]} tokens, seed {c.seed}",
    )
