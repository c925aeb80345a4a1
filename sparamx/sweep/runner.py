"""``python -m sparamx.sweep configs/sweeps/NAME.yaml``: a grid of experiments, each one
prune -> eval -> pack -> verify -> timed decode, with results appended row by row.

    python -m sparamx.sweep SWEEP.yaml --plan [--csv experiments.csv]  # write the plan only
    python -m sparamx.sweep SWEEP.yaml --from-csv experiments.csv      # run an edited plan
    python -m sparamx.sweep SWEEP.yaml                                  # plan + run
    python -m sparamx.sweep --resume experiment_results/2026-11-27_18-00-00
    python -m sparamx.sweep --report experiment_results/2026-11-27_18-00-00

A sweep file names a pipeline config (``base``) for everything that is not a grid axis
(calibration, eval tasks and limit, pack settings, module patterns), optional ``set``
overrides of it, and the ``grid``: model, method, allocation (uniform or owl),
sparsity, kv_sparsity, kernel, threads, context (prompt tokens) and new_tokens. The
grid expands into ``experiments.csv`` (one row per combination), which may be edited and run again.

A run writes ``experiment_results/YYYY-MM-DD_HH-MM-SS/``:

- ``sweep.json`` (the resolved sweep and base config) and ``experiments.csv`` (the plan);
- ``results.csv``: one line per finished experiment, appended (write + fsync) as soon
  as it finishes; ``--resume DIR`` skips the rows already there, drops a partial last
  line left by a crash and retries rows that were skipped or failed;
- ``artifacts/<model>-<method>[+owl]-<sparsity>-<patterns hash>/``: a pipeline run directory
  (load, calibrate, prune, eval, pack, verify, with its ``state.json``) shared by every
  experiment that differs only in run-time settings (kernel, threads, context, new
  tokens) and resumable like any pipeline run;
- ``baseline/``: the dense evaluation per model and one stock-transformers timing per
  (model, threads, context, new tokens), reused across rows;
- ``plots/*.png`` and ``summary.md`` (see :mod:`sparamx.sweep.report`).

Timings run in a fresh process per row (``sparamx.pipeline.bench``) with the row's thread count
and ``SPARAMX_KERNEL``, so no setting leaks between rows. The sparse model decodes
through ``sparamx.generate`` (compiled step; compile time is a separate column); the
stock baseline is transformers' ``model.generate`` on the dense bf16 model, i.e. what a
user runs without sparamx. Rows with ``kv_sparsity`` > 0 load the same artifact with the
sparse KV cache (timed with the base decode loop, which runs it too) and add its
decode-path perplexity (``eval.decode_ppl``) and memory ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from ..artifact import atomic_write_json
from ..pipeline.config import (
    Config,
    ConfigError,
    _build,
    prune_recipe,
    validate,
)
from ..pipeline.evaluate import evaluate, metric_line
from ..pipeline.runner import Pipeline, setup_logging
from ..pipeline.runstate import StageResult
from .grid import (
    AXES,
    AXIS_DEFAULTS,
    PLAN_COLUMNS,
    Experiment,
    SweepConfig,
    SweepError,
    check_value,
    expand_grid,
    load_sweep,
    read_plan,
    write_plan,
)
from .results import HEADLINE_METRICS, RESULT_COLUMNS, ResultsFile

log = logging.getLogger("sparamx.sweep")

TIMESTAMP = "%Y-%m-%d_%H-%M-%S"


# ------------------------------------------------------------------ running


def kernel_unavailable(kernel: str) -> str | None:
    """Why this CPU cannot run ``kernel`` (None when it can, or for ``auto``)."""
    if kernel in ("auto", "portable"):
        return None
    from ..ops import kernel_info

    info = kernel_info()
    cpu = info["cpu"]
    if kernel not in info["compiled"]:
        return f"kernel {kernel} is not compiled into this build ({', '.join(info['compiled'])})"
    need = {
        "avx2": ("avx2", "fma", "f16c", "bmi2", "popcnt", "os_avx"),
        "avx512": ("avx512f", "avx512bw", "avx512_bf16", "os_avx512"),
        "amx": ("amx_tile", "amx_bf16", "os_amx"),
    }[kernel]
    lacking = [f for f in need if not cpu.get(f)]
    if lacking:
        return f"this CPU cannot run kernel {kernel} (lacks {', '.join(lacking)})"
    return None


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._-" else "-" for c in text)
    return keep.strip("-")[-40:] or "model"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _metric_columns(eval_result: dict) -> list[str]:
    cols = []
    requested = eval_result.get("meta", {}).get("tasks") or list(eval_result.get("results", {}))
    for task in requested:
        metrics = eval_result.get("results", {}).get(task, {})
        for m in HEADLINE_METRICS:
            # acc_norm only where there is no acc (on our analogy task they are equal).
            if metrics.get(m) is not None and not (m == "acc_norm" and "acc" in metrics):
                cols.append(f"{task}:{m}")
    return cols


def _metric_values(eval_result: dict, columns: list[str], prefix: str = "") -> dict:
    out = {}
    for col in columns:
        task, metric = col.split(":", 1)
        v = eval_result.get("results", {}).get(task, {}).get(metric)
        out[prefix + col] = "" if v is None else f"{v:.6g}"
    return out


class Sweep:
    """Runs the experiments of one results folder. The four steps (``dense_eval``,
    ``artifact``, ``time_sparse``, ``time_stock``) are methods, each cached on disk in
    the folder, so a rerun only does what is missing."""

    def __init__(self, out_dir: Path, sweep: SweepConfig, base: Config):
        self.out = Path(out_dir)
        self.sweep, self.base = sweep, base
        self.results = ResultsFile(self.out / "results.csv")

    # ------------------------------------------------------------ folders
    @classmethod
    def create(cls, sweep: SweepConfig, base: Config, out: Path | None = None) -> Sweep:
        if out is None:
            stamp = dt.datetime.now().strftime(TIMESTAMP)
            out = Path(sweep.output_dir) / stamp
            n = 1
            while out.exists():  # two sweeps started in the same second
                n += 1
                out = Path(sweep.output_dir) / f"{stamp}_{n}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / "sweep.json",
            {"sweep": dataclasses.asdict(sweep), "base": base.to_dict()},
        )
        return cls(out, sweep, base)

    @classmethod
    def open(cls, out: Path) -> Sweep:
        meta = Path(out) / "sweep.json"
        if not meta.is_file():
            raise SweepError(f"--resume {out}: no sweep.json (not a sweep results folder)")
        data = json.loads(meta.read_text())
        try:
            sweep = _build(SweepConfig, data["sweep"])
            base = validate(_build(Config, data["base"]))
        except (ConfigError, KeyError) as e:
            raise SweepError(f"{meta}: {e}") from None
        return cls(Path(out), sweep, base)

    # ------------------------------------------------------------ steps
    def base_for(self, exp: Experiment) -> Config:
        cfg = _build(Config, self.base.to_dict())
        cfg.model.source = exp.model
        cfg.prune.method = exp.method
        cfg.prune.allocation = exp.allocation
        cfg.prune.sparsity = exp.sparsity
        cfg.bench.enabled = False
        cfg.kv.method = "none"  # artifacts carry no KV settings: rows set them (kv_settings)
        return validate(cfg)

    def kv_settings(self, exp: Experiment) -> dict | None:
        """The sparse KV cache settings of a row: None at kv_sparsity 0; else the base
        config's kv section (magnitude when its method is none) at the row's sparsity."""
        if exp.kv_sparsity == 0.0:
            return None
        kv = dataclasses.asdict(self.base.kv)
        if kv["method"] == "none":
            kv["method"] = "magnitude"
        kv["k_sparsity"] = kv["v_sparsity"] = exp.kv_sparsity
        return kv

    def kv_eval(self, exp: Experiment, artifact: Path, kv: dict) -> dict:
        """Decode-path perplexity of the artifact with the sparse KV cache and with our
        dense cache (``eval.decode_ppl``), once per (artifact, KV settings)."""
        path = self.artifact_dir(exp) / "kv" / f"decode-ppl-{_digest(kv)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from eval.decode_ppl import run as decode_ppl

        from ..artifact import load

        model, tok = load(str(artifact))
        settings = {k: v for k, v in kv.items() if k not in ("method", "k_sparsity", "v_sparsity")}
        res = decode_ppl(
            model, tok, (kv["method"],), kv["k_sparsity"], kv["v_sparsity"], **settings
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, res)
        return res

    def artifact_dir(self, exp: Experiment) -> Path:
        cfg = self.base_for(exp)
        # The patterns and every other artifact-shaping setting go into the name's hash,
        # so experiments share a directory exactly when they share an artifact.
        recipe = {"prune": prune_recipe(cfg.prune), "pack": dataclasses.asdict(cfg.pack)}
        recipe["model"] = dataclasses.asdict(cfg.model)
        method = exp.method + ("" if exp.allocation == "uniform" else f"+{exp.allocation}")
        name = f"{_slug(exp.model)}-{method}-{exp.sparsity:g}-{_digest(recipe)}"
        return self.out / "artifacts" / name

    @property
    def compute_dtype(self) -> str:
        """The base config's resolved ``model.compute_dtype`` (sparamx.cpu): the dense
        evaluation and the stock timing compute in it, as the pipeline's stages do."""
        from ..cpu import resolve_compute_dtype

        return resolve_compute_dtype(self.base.model.compute_dtype, self.base.model.dtype).resolved

    def dense_eval_path(self, model: str) -> Path:
        cfg = self.base
        key = {"model": model, "dtype": cfg.model.dtype, "eval": dataclasses.asdict(cfg.eval)}
        if self.compute_dtype != cfg.model.dtype:  # (keeps the keys of earlier sweeps)
            key["compute_dtype"] = self.compute_dtype
        key = _digest(key)
        return self.out / "baseline" / f"dense-eval-{_slug(model)}-{key}.json"

    def dense_eval(self, model: str) -> dict:
        """The dense model's evaluation (once per model, shared by all its artifacts)."""
        path = self.dense_eval_path(model)
        if path.is_file():
            return json.loads(path.read_text())
        import eval as sx_eval

        from ..models import load_model, parse_dtype

        m, tok = load_model(model, dtype=self.base.model.dtype, revision=self.base.model.revision)
        m.to(parse_dtype(self.compute_dtype))  # bf16 weight values, computed in this dtype
        e = self.base.eval
        res = sx_eval.evaluate(m, tok, e.tasks, limit=e.limit, batch_size=e.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        sx_eval.write_json(path, res)
        return res

    def artifact(self, exp: Experiment) -> dict:
        """Prune, evaluate, pack (and verify) through the pipeline's stages in the
        artifact's own run directory; finished stages are skipped on a rerun."""
        run_dir = self.artifact_dir(exp)
        dense = self.dense_eval(exp.model)
        pipe = SweepPipeline(self.base_for(exp), run_dir, dense)
        stages = ["load", "calibrate", "prune", "eval", "pack"]
        if self.sweep.verify:
            stages.append("verify")
        for stage in stages:
            pipe.run(only=stage)
        layers = json.loads((run_dir / "prune" / "layers.json").read_text())["layers"]
        total = sum(s["shape"][0] * s["shape"][1] for s in layers)
        nnz = sum(s["nnz"] for s in layers)
        return {
            "path": run_dir / "pack" / "artifact",
            "pruned": json.loads((run_dir / "eval" / "pruned.json").read_text()),
            "actual_sparsity": 1 - nnz / total if total else 0.0,
        }

    def time_sparse(self, exp: Experiment, artifact: Path) -> dict:
        from ..pipeline.bench import bench_subprocess

        kv = self.kv_settings(exp)
        return bench_subprocess(
            "sparse",
            str(Path(artifact).resolve()),
            exp.threads,
            [],
            exp.new_tokens,
            self.sweep.bench.repeats,
            self.compute_dtype,
            # the base config's decode loop, the sparse KV cache included (the lean loop
            # runs it too: sparamx.generate(kv=...))
            self.base.bench.engine,
            context=exp.context,
            kernel=exp.kernel,
            profile_kernels=False,
            kv=kv,
        )

    def time_stock(self, exp: Experiment) -> dict | None:
        """Stock transformers bf16 (dense, ``model.generate``), once per (model, threads,
        context, new tokens)."""
        if not self.sweep.bench.stock:
            return None
        key = f"{_slug(exp.model)}-t{exp.threads}-c{exp.context}-n{exp.new_tokens}"
        if self.compute_dtype != "bfloat16":
            key += f"-{self.compute_dtype}"
        path = self.out / "baseline" / f"stock-{key}-{_digest(exp.model)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from ..pipeline.bench import bench_subprocess

        rec = bench_subprocess(
            "stock",
            exp.model,
            exp.threads,
            [],
            exp.new_tokens,
            self.sweep.bench.repeats,
            self.compute_dtype,
            context=exp.context,
        )
        atomic_write_json(path, rec)
        return rec

    # ------------------------------------------------------------ rows
    def run_one(self, exp: Experiment) -> dict:
        start = time.perf_counter()
        row = exp.as_row()
        why = kernel_unavailable(exp.kernel)
        if why:
            log.warning("%s: skipped: %s", exp.id, why)
            row["status"] = f"skipped: {why}"
            return row
        dense = self.dense_eval(exp.model)
        art = self.artifact(exp)
        sparse = self.time_sparse(exp, art["path"])
        load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        stock = self.time_stock(exp)
        row.update(_metric_values(art["pruned"], self.metric_columns))
        row.update(_metric_values(dense, self.metric_columns, prefix="dense:"))
        row.update(
            status="ok",
            kernel_used=sparse.get("kernel", exp.kernel) if exp.kernel != "auto" else _auto(),
            actual_sparsity=f"{art['actual_sparsity']:.4f}",
            tokens_per_s=f"{sparse['tokens_per_s']:.3f}",
            ms_per_token=f"{sparse['ms_per_token']:.3f}",
            ttft_ms=f"{sparse['ttft_ms']:.1f}",
            compile_s=f"{sparse.get('compile_s', 0.0):.1f}",
            peak_rss_mb=f"{sparse['peak_rss_mb']:.0f}",
            model_bytes=sparse["model_bytes"],
            prompt_tokens=sparse.get("prompt_tokens", ""),
            artifact=str(Path(art["path"]).relative_to(self.out)),
            load_avg="" if load_avg is None else f"{load_avg:.2f}",
        )
        kv = self.kv_settings(exp)
        if kv is not None:
            r = self.kv_eval(exp, art["path"], kv)["results"]
            ours = r[kv["method"]]
            row.update(
                kv_method=kv["method"],
                kv_decode_ppl=f"{ours['ppl']:.4f}",
                kv_dense_decode_ppl=f"{r['none']['ppl']:.4f}",
                kv_memory_ratio=f"{ours['memory_ratio']:.4f}",
            )
        if stock:
            row["stock_tokens_per_s"] = f"{stock['tokens_per_s']:.3f}"
            row["speedup"] = f"{sparse['tokens_per_s'] / stock['tokens_per_s']:.3f}"
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        return row

    def run(self, experiments: list[Experiment], progress: bool = True) -> list[dict]:
        """Run the experiments not yet in results.csv; returns all ok rows."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        done_rows = self.results.load()
        done = {_row_key(r) for r in done_rows}
        pending = [e for e in experiments if e.key() not in done]
        log.info(
            "%d experiments: %d finished earlier, %d to run (results in %s)",
            len(experiments),
            len(experiments) - len(pending),
            len(pending),
            self.out,
        )
        if self.results.header is None:
            first = next((e for e in experiments if not kernel_unavailable(e.kernel)), None)
            dense = self.dense_eval(first.model) if first else {}
            self.metric_columns = _metric_columns(dense)
            self.results.header = [
                *PLAN_COLUMNS,
                *self.metric_columns,
                *(f"dense:{c}" for c in self.metric_columns),
                *RESULT_COLUMNS,
            ]
        else:
            self.metric_columns = [
                c for c in self.results.header if ":" in c and not c.startswith("dense:")
            ]
        rows = list(done_rows)
        with logging_redirect_tqdm():
            bar = tqdm(pending, desc="sweep", unit="exp", disable=not progress, dynamic_ncols=True)
            for exp in bar:
                bar.set_postfix_str(
                    f"{exp.id} {exp.method} {exp.allocation} {exp.sparsity:g} t{exp.threads} "
                    f"{exp.kernel}"
                )
                try:
                    row = self.run_one(exp)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one failed row must not end the sweep
                    log.error("%s failed:\n%s", exp.id, traceback.format_exc())
                    row = exp.as_row()
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                row["finished"] = dt.datetime.now().isoformat(timespec="seconds")
                self.results.append(row)
                if row["status"] == "ok":
                    rows.append({k: str(v) for k, v in row.items()})
                    log.info(
                        "%s: %s tok/s (x%s vs stock)",
                        exp.id,
                        row["tokens_per_s"],
                        row.get("speedup", "?"),
                    )
        return rows


def _auto() -> str:
    from ..ops import kernel_info

    return kernel_info()["decode"]


def _row_key(row: dict) -> str:
    try:
        row = {**AXIS_DEFAULTS, **{k: v for k, v in row.items() if v not in (None, "")}}
        values = {a: check_value(a, row[a], f"results.csv {a}") for a in AXES}
        exp = Experiment(id=row["id"], **values)
    except (KeyError, SweepError):
        return ""
    return exp.key()


class SweepPipeline(Pipeline):
    """The pipeline's stages for one artifact of a sweep; the dense evaluation, the same
    for every artifact of a model, is computed once by the sweep and copied in."""

    def __init__(self, cfg: Config, run_dir: Path, dense_eval: dict):
        super().__init__(cfg, run_dir)
        self.dense_eval = dense_eval

    def stage_eval(self) -> StageResult:
        import eval as sx_eval

        sx_eval.write_json(self.path("eval", "dense.json"), self.dense_eval)
        pruned = evaluate(self, *self.pruned_model(), self.path("eval", "pruned.json"), "pruned")
        return StageResult(
            ["eval/dense.json", "eval/pruned.json"],
            f"dense {metric_line(self.dense_eval)} | pruned {metric_line(pruned)}",
        )


# ------------------------------------------------------------------ CLI


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m sparamx.sweep",
        description="expand a grid of experiments, run them, append results row by row",
    )
    ap.add_argument("sweep", nargs="?", help="sweep file (configs/sweeps/*.yaml)")
    ap.add_argument("--plan", action="store_true", help="only write the expanded plan")
    ap.add_argument(
        "--csv", default="experiments.csv", help="where --plan writes (default experiments.csv)"
    )
    ap.add_argument("--from-csv", default=None, help="run this (edited) plan, not the grid")
    ap.add_argument("--resume", default=None, metavar="DIR", help="continue a results folder")
    ap.add_argument("--report", default=None, metavar="DIR", help="redo plots + summary.md")
    ap.add_argument("--out", default=None, help="results folder (default: a new timestamped one)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep field, e.g. grid.threads=1,2 or set=[eval.limit=5]",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    given = [bool(args.sweep), bool(args.resume), bool(args.report)]
    if sum(given) != 1:
        ap.error("give a sweep file, or --resume DIR, or --report DIR (exactly one)")
    if (args.resume or args.report) and (args.plan or args.from_csv):
        ap.error("--plan / --from-csv go with a sweep file, not with --resume / --report")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from .report import write_sweep_report

    try:
        if args.report:
            out = Path(args.report)
            setup_logging(None)
            files = write_sweep_report(out)
            print("\n".join(str(f) for f in files))
            return 0
        if args.resume:
            out = Path(args.resume)
            sw = Sweep.open(out)
            setup_logging(out / "sweep.log")
            experiments = read_plan(out / "experiments.csv")
        else:
            sweep, base = load_sweep(args.sweep, args.overrides)
            experiments = read_plan(Path(args.from_csv)) if args.from_csv else expand_grid(sweep)
            if args.plan:
                setup_logging(None)
                write_plan(Path(args.csv), experiments)
                for kernel in sorted({e.kernel for e in experiments}):
                    if why := kernel_unavailable(kernel):
                        log.warning("%s: its experiments will be skipped on this CPU", why)
                print(f"{len(experiments)} experiments written to {args.csv}")
                return 0
            sw = Sweep.create(sweep, base, Path(args.out) if args.out else None)
            setup_logging(sw.out / "sweep.log")
            # The plan as run (an edited CSV normalized): what --resume reads back.
            write_plan(sw.out / "experiments.csv", experiments)
    except SweepError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = sw.run(experiments, progress=not args.no_progress)
    files = write_sweep_report(sw.out)
    log.info(
        "%d/%d experiments ok in %.1f min; results: %s; report: %s",
        len(rows),
        len(experiments),
        (time.perf_counter() - t0) / 60,
        sw.results.path,
        ", ".join(str(f.name) for f in files),
    )
    return 0
