"""The sweep file and its plan: ``SweepConfig`` (what a sweep YAML holds), its checks,
the grid's expansion into ``Experiment`` rows and ``experiments.csv`` (written, and read
back after an edit, every cell checked).
"""

from __future__ import annotations

import csv
import io
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import atomic_write_text
from ..pipeline.config import (
    ALLOCATIONS,
    METHODS,
    Config,
    ConfigError,
    _build,
    apply_overrides,
    load_config,
    read_yaml_mapping,
)

AXES = (
    "model",
    "method",
    "allocation",
    "sparsity",
    "kv_sparsity",
    "kernel",
    "threads",
    "context",
    "new_tokens",
)
# Axes that change the pruned/packed artifact; the others are run-time settings only.
ARTIFACT_AXES = ("model", "method", "allocation", "sparsity")
# Axes a plan or results file may omit (written before they existed): their value then.
AXIS_DEFAULTS = {"allocation": "uniform"}
KERNELS = ("auto", "amx", "avx512", "avx2", "portable")
PLAN_COLUMNS = ("id", *AXES)


class SweepError(ValueError):
    """A bad sweep file, plan row or results folder; the message names the field."""


# ------------------------------------------------------------------ config


@dataclass
class GridConfig:
    model: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    method: list[str] = field(default_factory=lambda: ["wanda"])
    # uniform, or owl (layer sparsities from outlier ratios; lambda and m from the base
    # config's prune.owl)
    allocation: list[str] = field(default_factory=lambda: ["uniform"])
    sparsity: list[float] = field(default_factory=lambda: [0.5])
    # KV-cache sparsity (K and V); > 0 decodes with the sparse KV cache (method and
    # other settings from the base config's kv section; magnitude when it says none)
    kv_sparsity: list[float] = field(default_factory=lambda: [0.0])
    kernel: list[str] = field(default_factory=lambda: ["auto"])  # SPARAMX_KERNEL
    threads: list[int] = field(default_factory=lambda: [1])
    context: list[int] = field(default_factory=lambda: [32])  # prompt length in tokens
    new_tokens: list[int] = field(default_factory=lambda: [64])


@dataclass
class SweepBenchConfig:
    repeats: int = 3  # median over repeats; a warm-up generation is not timed
    stock: bool = True  # time the stock transformers baseline (speed-up column)


@dataclass
class SweepConfig:
    name: str = "sweep"
    output_dir: str = "experiment_results"
    base: str | None = None  # pipeline config (relative to this file or the cwd)
    set: list[str] = field(default_factory=list)  # key=value overrides of the base
    grid: GridConfig = field(default_factory=GridConfig)
    bench: SweepBenchConfig = field(default_factory=SweepBenchConfig)
    verify: bool = True  # packed vs masked dense logits check per artifact


@dataclass(frozen=True)
class Experiment:
    id: str
    model: str
    method: str
    allocation: str
    sparsity: float
    kv_sparsity: float
    kernel: str
    threads: int
    context: int
    new_tokens: int

    def key(self) -> str:
        """The settings (without the id): what makes a result row reusable."""
        return "|".join(_fmt(getattr(self, a)) for a in AXES)

    def artifact_settings(self) -> tuple:
        return tuple(getattr(self, a) for a in ARTIFACT_AXES)

    def as_row(self) -> dict:
        return {c: _fmt(getattr(self, c)) for c in PLAN_COLUMNS}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def check_value(axis: str, raw, where: str):
    """Parse and check one value of ``axis``; ``where`` names the field in errors (e.g.
    ``grid.sparsity[2]``), which also say what is allowed."""
    f = where
    text = str(raw).strip() if raw is not None else ""
    if axis in ("model",):
        if not text:
            raise SweepError(f"{f}: expected a model source (hub id, HF dir, .gguf, built-in)")
        return text
    if axis == "method":
        if text not in METHODS:
            raise SweepError(f"{f}: {raw!r} is not one of {', '.join(METHODS)}")
        return text
    if axis == "allocation":
        if text not in ALLOCATIONS:
            raise SweepError(f"{f}: {raw!r} is not one of {', '.join(ALLOCATIONS)}")
        return text
    if axis == "kernel":
        if text not in KERNELS:
            raise SweepError(f"{f}: {raw!r} is not one of {', '.join(KERNELS)}")
        return text
    if axis in ("sparsity", "kv_sparsity"):
        try:
            v = float(text)
        except ValueError:
            raise SweepError(f"{f}: {raw!r} is not a number (allowed: 0 <= value < 1)") from None
        if not 0.0 <= v < 1.0:
            raise SweepError(f"{f}: {raw!r} is out of range (allowed: 0 <= value < 1)")
        return v
    if axis in ("threads", "context", "new_tokens"):
        try:
            v = int(text)
        except ValueError:
            raise SweepError(f"{f}: {raw!r} is not an integer") from None
        low = 2 if axis == "new_tokens" else 1
        if v < low:
            raise SweepError(f"{f}: {raw!r} is out of range (allowed: >= {low})")
        return v
    raise SweepError(f"unknown axis {axis!r}")  # pragma: no cover


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, Config]:
    """Read a sweep file; return it and its resolved base pipeline config."""
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file", SweepError)
    try:
        data = apply_overrides(data, overrides or [])
        sweep = _build(SweepConfig, data)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    base_path = None
    if sweep.base:
        for cand in (p.parent / sweep.base, Path(sweep.base)):
            if cand.is_file():
                base_path = cand
                break
        if base_path is None:
            raise SweepError(
                f"base: pipeline config {sweep.base!r} not found (next to {p} or here)"
            )
    try:
        base = load_config(base_path, list(sweep.set))
    except ConfigError as e:
        raise SweepError(f"base config ({sweep.base or 'defaults'}): {e}") from None
    check_sweep(sweep, base)
    return sweep, base


def check_sweep(sweep: SweepConfig, base: Config) -> None:
    for axis in AXES:
        values = getattr(sweep.grid, axis)
        if not values:
            raise SweepError(f"grid.{axis}: empty list (give at least one value)")
        for i, v in enumerate(values):
            check_value(axis, v, f"grid.{axis}[{i}]")
        if len(set(map(str, values))) != len(values):
            raise SweepError(f"grid.{axis}: repeated values {values}")
    if sweep.bench.repeats < 1:
        raise SweepError(f"bench.repeats: {sweep.bench.repeats!r} must be >= 1")


def expand_grid(sweep: SweepConfig) -> list[Experiment]:
    """Every combination of the grid, artifact axes outermost so that experiments sharing
    an artifact run one after another."""
    g = sweep.grid
    combos = list(itertools.product(*(getattr(g, a) for a in AXES)))
    width = max(2, len(str(len(combos))))
    out = []
    for i, values in enumerate(combos, 1):
        parsed = {a: check_value(a, v, f"grid.{a}") for a, v in zip(AXES, values, strict=True)}
        out.append(Experiment(id=f"e{i:0{width}d}", **parsed))
    return out


# ------------------------------------------------------------------ CSV files


def _csv_line(values: list) -> str:
    buf = io.StringIO()
    # One physical line per record (a partial last line is then easy to detect).
    csv.writer(buf, lineterminator="\n").writerow(
        [str(v).replace("\r", " ").replace("\n", " ") if v is not None else "" for v in values]
    )
    return buf.getvalue()


def write_plan(path: Path, experiments: list[Experiment]) -> None:
    text = _csv_line(list(PLAN_COLUMNS)) + "".join(
        _csv_line([e.as_row()[c] for c in PLAN_COLUMNS]) for e in experiments
    )
    atomic_write_text(path, text)


def read_plan(path: Path) -> list[Experiment]:
    """Parse (an edited) ``experiments.csv``; every cell is checked, errors name the row."""
    if not path.is_file():
        raise SweepError(f"plan {path} not found")
    rows = list(csv.reader(path.read_text().splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise SweepError(f"{path}: empty (expected a header: {','.join(PLAN_COLUMNS)})")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in AXES if c not in header and c not in AXIS_DEFAULTS]
    unknown = [c for c in header if c not in PLAN_COLUMNS]
    if missing or unknown:
        raise SweepError(
            f"{path}: header {'misses ' + ', '.join(missing) if missing else ''}"
            f"{'; ' if missing and unknown else ''}"
            f"{'has unknown columns ' + ', '.join(unknown) if unknown else ''} "
            f"(allowed columns: {', '.join(PLAN_COLUMNS)}; id optional)"
        )
    out, ids, keys = [], set(), set()
    for n, r in enumerate(rows[1:], 2):
        if len(r) != len(header):
            raise SweepError(f"{path} line {n}: {len(r)} fields, the header has {len(header)}")
        cells = dict(zip(header, r, strict=True))
        eid = cells.get("id", "").strip() or f"row{n - 1}"
        where = f"{path.name} line {n} (id {eid})"
        if eid in ids:
            raise SweepError(f"{where}: id {eid!r} is used twice")
        cells = {**AXIS_DEFAULTS, **cells}
        parsed = {a: check_value(a, cells[a], f"{where} column {a}") for a in AXES}
        exp = Experiment(id=eid, **parsed)
        if exp.key() in keys:
            raise SweepError(f"{where}: the same settings as an earlier row")
        ids.add(eid)
        keys.add(exp.key())
        out.append(exp)
    if not out:
        raise SweepError(f"{path}: no experiments (only a header)")
    return out
