"""``python -m sparamx.pipeline CONFIG``: model -> pruned -> evaluated -> packed ->
verified -> timed -> report, in stages that each write into ``runs/NAME/<stage>/``.

    load -> calibrate -> prune -> eval (dense, pruned) -> pack -> verify
         -> eval-packed -> bench (stock vs sparse) -> report

``state.json`` holds each stage's input hash and output fingerprints: a rerun skips
finished stages, an interrupted run resumes at the first unfinished one, ``--only``
runs one stage (its upstream must be done), ``--force`` re-runs the named stages
(and, through the hashes, whatever depends on them).

This module orders the stages and hashes their inputs; each stage is a module of this
package (``load``, ``calibrate``, ``prune``, ``evaluate`` for eval and eval-packed,
``pack``, ``verify``, ``bench``, ``report``) whose ``run_stage(pipeline)`` returns a
:class:`~sparamx.pipeline.runstate.StageResult`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ..artifact import atomic_write_json
from ..cpu import resolve_compute_dtype
from ..models import parse_dtype
from .config import Config, ConfigError, load_config, needs_calibration, prune_recipe
from .runstate import RunState, StageResult, hash_inputs

log = logging.getLogger("sparamx.pipeline")

STAGES = ("load", "calibrate", "prune", "eval", "pack", "verify", "eval-packed", "bench", "report")
# Which upstream stages' outputs each stage reads (their fingerprints enter its hash).
UPSTREAM = {
    "load": (),
    "calibrate": ("load",),
    "prune": ("load", "calibrate"),
    "eval": ("load", "prune"),
    "pack": ("load", "prune", "eval"),
    "verify": ("load", "prune", "pack"),
    "eval-packed": ("pack",),
    "bench": ("load", "pack"),
    "report": ("load", "prune", "eval", "pack", "verify", "eval-packed", "bench"),
}
# Which config sections each stage reads.
SECTIONS = {
    "load": ("model",),
    "calibrate": ("prune.method", "prune.allocation", "prune.calibration"),
    "prune": ("prune",),
    "eval": ("eval", "model.dtype"),
    "pack": ("pack", "kv"),
    "verify": (),
    "eval-packed": ("eval", "kv"),
    "bench": ("bench", "model", "kv"),
    "report": (),
}
# Stages whose results depend on the arithmetic dtype (model.compute_dtype, resolved:
# "auto" enters the hash as what it resolved to on this CPU). Prune only for methods
# that run calibration forwards; pack writes bf16 weights whatever the compute dtype
# (it still re-runs after eval, whose results it embeds in the manifest).
COMPUTE_STAGES = ("eval", "verify", "eval-packed", "bench", "report")


class Pipeline:
    def __init__(self, cfg: Config, run_dir: Path | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(self.run_dir)
        # Resolved once per run: what calibration, the evaluations and the stock baseline
        # compute in (sparamx.cpu: fp32 where the CPU has no fast bf16 matmul).
        self.compute = resolve_compute_dtype(cfg.model.compute_dtype, cfg.model.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.compute.resolved)

    # ---------------------------------------------------------------- plumbing
    def path(self, stage: str, name: str = "") -> Path:
        p = self.run_dir / stage / name
        (self.run_dir / stage).mkdir(parents=True, exist_ok=True)
        return p

    def inputs_hash(self, stage: str) -> str:
        cfg = self.cfg.to_dict()
        # The requested compute dtype is left out of the "model" section (a change from
        # auto to the value auto resolves to re-runs nothing, and hashes of runs made
        # before the field existed stay valid); the resolved one enters below.
        cfg["model"].pop("compute_dtype")
        cfg["prune"] = prune_recipe(self.cfg.prune)  # only the settings in use
        sections = {}
        for s in SECTIONS[stage]:
            node = cfg
            for part in s.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:  # absent: a setting the recipe does not use
                sections[s] = node
        upstream = {u: self.state.outputs_fingerprint(u) for u in UPSTREAM[stage]}
        inputs = {"stage": stage, "config": sections, "upstream": upstream}
        if stage in COMPUTE_STAGES or (stage == "prune" and needs_calibration(self.cfg.prune)):
            inputs["compute_dtype"] = self.compute.resolved
        return hash_inputs(inputs)

    def run(self, only: str | None = None, force: tuple[str, ...] = ()) -> None:
        stages = STAGES if only is None else (only,)
        self.state.set_meta("compute_dtype", self.compute.to_dict())
        log.info("compute dtype %s (%s)", self.compute.resolved, self.compute.reason)
        if only is not None:
            for u in UPSTREAM[only]:
                if not self.state.is_done(u, self.inputs_hash(u)):
                    raise RuntimeError(
                        f"--only {only}: upstream stage {u!r} is not done "
                        "(run the pipeline without --only first)"
                    )
        for stage in stages:
            if stage == "bench" and not self.cfg.bench.enabled:
                log.info("[bench] disabled in config (bench.enabled=false)")
                continue
            h = self.inputs_hash(stage)
            if stage not in force and self.state.is_done(stage, h):
                log.info("[%s] up to date: %s", stage, self.state.summary(stage))
                continue
            log.info("[%s] running", stage)
            t0 = time.perf_counter()
            res = getattr(self, "stage_" + stage.replace("-", "_"))()
            dt = time.perf_counter() - t0
            self.state.record(stage, h, res.outputs, res.summary, dt)
            log.info("[%s] done in %.1f s: %s", stage, dt, res.summary)

    # ---------------------------------------------------------------- models
    def source_dir(self) -> Path:
        """The model's local directory (hub snapshot, converted GGUF, or the directory)."""
        from ..models import local_model_dir

        m = self.cfg.model
        return local_model_dir(m.source, m.revision)

    @property
    def streaming(self) -> bool:
        """Whether prune + pack stream layer by layer (``model.streaming``; auto: when 3x
        the weights would not fit in the available RAM)."""
        if getattr(self, "_streaming", None) is None:
            mode = self.cfg.model.streaming
            recorded = self.run_dir / "load" / "source.json"
            if mode == "auto" and self.state.is_done("load", self.inputs_hash("load")):
                # Decided once, by the load stage: free RAM changes between stages, and
                # a run must not prune in memory and then pack streaming.
                import json

                self._streaming = bool(json.loads(recorded.read_text()).get("streaming"))
            elif mode == "auto":
                from ..models import available_ram_bytes
                from .streaming import CheckpointError, SafetensorsCheckpoint

                try:
                    numel = SafetensorsCheckpoint(self.source_dir()).numel()
                except CheckpointError:
                    numel = 0  # no safetensors (e.g. .bin weights): in memory it is
                # In memory, the model is held in the wider of the two dtypes.
                itemsize = max(
                    parse_dtype(self.cfg.model.dtype).itemsize, self.compute_dtype.itemsize
                )
                size = numel * itemsize
                self._streaming = 3 * size > available_ram_bytes()
                log.info(
                    "model.streaming=auto: %.1f GB of weights, %.1f GB RAM available: %s",
                    size / 1e9,
                    available_ram_bytes() / 1e9,
                    "streaming" if self._streaming else "in memory",
                )
            else:
                self._streaming = mode == "true"
        return self._streaming

    def tokenizer(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.source_dir())
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def dense_model(self, compute: bool = True):
        """A fresh dense model and tokenizer (cheap: the source is a cached HF dir),
        loaded in ``model.dtype`` (bf16: the weight values that get packed) and, with
        ``compute``, cast to the compute dtype: an fp32 model holding bf16 values
        evaluates exactly the weights that are packed, in fp32 arithmetic."""
        from ..models import load_model

        m = self.cfg.model
        model, tok = load_model(m.source, dtype=m.dtype, revision=m.revision)
        if compute and model.dtype != self.compute_dtype:
            model.to(self.compute_dtype)
        return model, tok

    def pruned_model(self, compute: bool = True):
        """The dense model with the pruned weights of the prune stage applied."""
        from safetensors.torch import load_file

        model, tok = self.dense_model(compute)
        weights = load_file(self.path("prune", "weights.safetensors"))
        with torch.no_grad():
            for name, w in weights.items():
                model.get_submodule(name).weight.copy_(w)
        return model, tok

    # ---------------------------------------------------------------- stages
    # One module per stage (imported on use: verify and pack need the native ops).

    def stage_load(self) -> StageResult:
        from .load import run_stage

        return run_stage(self)

    def stage_calibrate(self) -> StageResult:
        from .calibrate import run_stage

        return run_stage(self)

    def stage_prune(self) -> StageResult:
        from .prune import run_stage

        return run_stage(self)

    def stage_eval(self) -> StageResult:
        from .evaluate import run_stage

        return run_stage(self)

    def stage_pack(self) -> StageResult:
        from .pack import run_stage

        return run_stage(self)

    def stage_verify(self) -> StageResult:
        from .verify import run_stage

        return run_stage(self)

    def stage_eval_packed(self) -> StageResult:
        from .evaluate import run_packed_stage

        return run_packed_stage(self)

    def stage_bench(self) -> StageResult:
        from .bench import run_stage

        return run_stage(self)

    def stage_report(self) -> StageResult:
        from .report import run_stage

        return run_stage(self)


def setup_logging(log_file: Path | None) -> None:
    """INFO to stderr and, when given, to ``log_file``; quiet the chatty libraries."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None:
        fileh = logging.FileHandler(log_file)
        fileh.setFormatter(fmt)
        root.addHandler(fileh)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task chatter at WARNING


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sparamx.pipeline", description="prune, evaluate, pack, verify, time, report"
    )
    ap.add_argument("config", help="YAML config (configs/*.yaml)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    ap.add_argument("--out", default=None, help="run directory (default output_dir/name)")
    ap.add_argument("--only", choices=STAGES, default=None, help="run one stage")
    ap.add_argument(
        "--force",
        choices=STAGES,
        action="append",
        default=[],
        help="re-run this stage even if up to date (repeatable)",
    )
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    pipe = Pipeline(cfg, args.out)
    setup_logging(pipe.run_dir / "pipeline.log")
    atomic_write_json(pipe.run_dir / "config.json", cfg.to_dict())
    pipe.run(only=args.only, force=tuple(args.force))
    log.info("run directory: %s", pipe.run_dir)
    return 0


def cli() -> None:
    sys.exit(main())
