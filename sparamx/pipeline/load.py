"""Stage ``load``: resolve the model source (writing a random-weight model first when
``model.random`` asks for one) and record it in ``load/source.json``; a streaming run
reads the record from config.json and the safetensors headers, never the weights."""

from __future__ import annotations

from ..artifact import atomic_write_json
from .runstate import StageResult


def run_stage(pipe) -> StageResult:
    from ..models import resolve_source, source_record

    r = pipe.cfg.model.random
    if r.preset != "none":
        from ..tools.random_model import ensure_random_model

        ensure_random_model(pipe.cfg.model.source, r.preset, r.num_layers, r.seed)
    if pipe.streaming:
        return _run_streaming(pipe)
    path, _ = resolve_source(pipe.cfg.model.source)
    model, _ = pipe.dense_model()
    n = sum(p.numel() for p in model.parameters())
    rec = {
        **source_record(pipe.cfg.model.source, path, pipe.cfg.model.revision),
        "architecture": type(model).__name__,
        "parameters": n,
        "dtype": pipe.cfg.model.dtype,
        "streaming": False,
        "config": model.config.to_dict(),
    }
    atomic_write_json(pipe.path("load", "source.json"), rec)
    return StageResult(
        ["load/source.json"],
        f"{rec['architecture']} {n / 1e6:.1f}M parameters ({rec['dtype']})",
    )


def _run_streaming(pipe) -> StageResult:
    """What the in-memory load stage records, read from config.json and the
    safetensors headers: the weights are never loaded here."""
    from transformers import AutoConfig

    from ..models import source_record
    from .streaming import SafetensorsCheckpoint

    path = pipe.source_dir()
    config = AutoConfig.from_pretrained(path)
    n = SafetensorsCheckpoint(path).numel()
    arch = (config.architectures or [config.model_type])[0]
    rec = {
        **source_record(pipe.cfg.model.source, str(path), pipe.cfg.model.revision),
        "architecture": arch,
        "parameters": n,
        "dtype": pipe.cfg.model.dtype,
        "streaming": True,
        "config": config.to_dict(),
    }
    atomic_write_json(pipe.path("load", "source.json"), rec)
    return StageResult(
        ["load/source.json"],
        f"{arch} {n / 1e6:.1f}M parameters ({rec['dtype']}), streamed layer by layer",
    )
