"""Run lm-eval on an in-memory model (dense, masked or loaded from a packed artifact).

``evaluate`` wraps the model in lm-eval's ``HFLM``, loads the tasks (ours from
``eval/tasks/`` with their data prepared on first use, any other name from lm-eval's
registry), runs ``lm_eval.simple_evaluate`` and returns a JSON-ready dict:

- ``results``: ``{task_or_group: {metric: value}}`` with lm-eval's metric names
  (``word_perplexity``, ``acc``, ``acc_stderr``, ...); the ``,none`` filter suffix is
  dropped, a stderr lm-eval cannot compute ("N/A") becomes None.
- ``lm_eval``: the parts of lm-eval's own output a report needs (``results``,
  ``groups``, ``group_subtasks``, ``versions``, ``n-shot``, ``higher_is_better``,
  ``n-samples``, ``config``); ``lm_eval.utils.make_table(out["lm_eval"])`` prints it.
- ``meta``: tasks, limit, batch size, model name/dtype, wall time, versions, and the
  sha256 of the prepared data files the offline tasks read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import data as eval_data
from .registry import offline_tasks, split_tasks, task_manager

log = logging.getLogger(__name__)

RAW_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
)
# Per-task entries of lm-eval's results that are labels, not metrics.
NON_METRIC_KEYS = {"alias", "name", "sample_len", "sample_count"}


class EmptyTaskError(ValueError):
    """A task resolved to zero documents."""


def quiet_lm_eval(level: int = logging.ERROR) -> None:
    """Make lm-eval's logging quiet unless the caller already set its level.

    lm-eval logs every task, seed and model warning at INFO/WARNING; set
    ``logging.getLogger("lm_eval").setLevel(logging.INFO)`` beforehand to see them.
    """
    logger = logging.getLogger("lm_eval")
    if logger.level == logging.NOTSET:
        logger.setLevel(level)


def _number(value):
    """A JSON-ready metric value: float, or None for lm-eval's "N/A"/NaN."""
    if isinstance(value, bool):
        return float(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def clean_results(raw_results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``results`` -> ``{task: {metric: value}}`` (see the module docstring)."""
    out = {}
    for task, metrics in raw_results.items():
        clean = {}
        for key, value in metrics.items():
            if key in NON_METRIC_KEYS:
                continue
            metric, _, filt = key.partition(",")
            # Tasks with real filters (e.g. "strict-match") keep the suffix so that
            # two filters of one metric stay apart.
            clean[metric if filt in ("", "none") else key] = _number(value)
        out[task] = clean
    return out


def _json_ready(obj):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def _check_not_empty(loaded: dict) -> None:
    for name, task in loaded["tasks"].items():
        n = len(task.eval_docs)
        if n == 0:
            source = task.config.dataset_kwargs or task.config.dataset_path
            raise EmptyTaskError(f"task {name!r} has an empty dataset (source: {source})")


class TaskLoadError(RuntimeError):
    """lm-eval could not build a task (e.g. a hub task's dataset is unreachable)."""


@dataclass(frozen=True)
class ResolvedTasks:
    """Task names checked against a ``TaskManager`` that can load them all.

    Resolving once and passing this to several ``evaluate`` calls (dense, pruned,
    packed) skips lm-eval's ~10 s index build for hub tasks after the first.
    """

    names: tuple[str, ...]
    manager: object  # lm_eval.tasks.TaskManager
    prepared: eval_data.PreparedData | None


def resolve_tasks(tasks: str | list[str] | ResolvedTasks) -> ResolvedTasks:
    """Check task names (UnknownTaskError) and prepare our offline data if needed."""
    if isinstance(tasks, ResolvedTasks):
        return tasks
    quiet_lm_eval()
    names = split_tasks(tasks)
    ours = offline_tasks()
    prepared = eval_data.prepare() if any(n in ours for n in names) else None
    return ResolvedTasks(tuple(names), task_manager(names, prepared), prepared)


def _local_data_files(manager, name: str) -> list[tuple[str, Path]]:
    """(task, path) for every local ``data_files`` entry under task/group ``name``."""
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    if "group" in cfg:
        children = cfg.get("task") or []
        return [
            pair
            for child in (children if isinstance(children, list) else [children])
            for pair in _local_data_files(manager, child if isinstance(child, str) else "")
        ]
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    flat = [f for x in (files if isinstance(files, list) else [files]) for f in _as_list(x)]
    return [(name, Path(f)) for f in flat if isinstance(f, str) and "://" not in f]


def _as_list(x):
    return x if isinstance(x, list) else [x]


def load_tasks(resolved: ResolvedTasks) -> dict:
    """Build fresh lm-eval Task/Group objects; fail clearly on missing or empty data."""
    local = [pair for n in resolved.names for pair in _local_data_files(resolved.manager, n)]
    # Checked here because the datasets library fails on an empty JSON file with a bare
    # StopIteration that names neither the task nor the file.
    for task, path in local:
        if not path.is_file():
            raise TaskLoadError(f"task {task!r}: data file {path} does not exist")
        if not path.read_bytes().strip():
            raise EmptyTaskError(f"task {task!r} has an empty dataset ({path} is empty)")
    try:
        loaded = resolved.manager.load(list(resolved.names))
    except Exception as e:
        with_local = {t for t, _ in local}
        hub = [n for n in resolved.names if n not in offline_tasks() and n not in with_local]
        hint = f" ({', '.join(hub)} may need the Hugging Face hub or its cache)" if hub else ""
        raise TaskLoadError(
            f"could not load task(s) {', '.join(resolved.names)}: {type(e).__name__}: {e}{hint}"
        ) from e
    _check_not_empty(loaded)
    return loaded


def evaluate(
    model,
    tokenizer,
    tasks: str | list[str] | ResolvedTasks,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    *,
    max_length: int | None = None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
) -> dict:
    """Evaluate ``model`` (a transformers causal LM, in memory) with lm-eval.

    ``tasks``: names, ``"a,b"`` or a ``ResolvedTasks``; ours (``lee_news_ppl``,
    ``word_analogy_mc`` and its ``word_analogy_mc_<section>`` subtasks) or any lm-eval
    task. ``limit``: documents per task (per subtask for a group); a float below 1 is
    a fraction. ``batch_size``: lm-eval's (an int, or "auto"). ``bootstrap_iters``:
    lm-eval's default; it only matters for metrics whose stderr lm-eval bootstraps.
    Returns the dict described in this module's docstring (plus ``samples`` when
    ``log_samples``). Note that lm-eval seeds python's, numpy's and torch's global
    generators (to its fixed defaults) on every run.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit <= 0:
        raise EmptyTaskError(f"limit={limit} leaves no documents to evaluate")
    quiet_lm_eval()
    resolved = resolve_tasks(tasks)
    names, prepared = list(resolved.names), resolved.prepared
    loaded = load_tasks(resolved)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    start = time.perf_counter()
    # The loaded Task/Group objects go in directly, so lm-eval does not load each
    # dataset a second time (a tag, which has no object, goes in by name).
    objects = [
        loaded["groups"][n] if n in loaded["groups"] else loaded["tasks"].get(n, n) for n in names
    ]
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=objects,
        limit=limit,
        batch_size=batch_size,
        task_manager=resolved.manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
    )
    wall = time.perf_counter() - start
    out = {
        "results": clean_results(raw["results"]),
        "meta": {
            "tasks": names,
            "limit": limit,
            "batch_size": batch_size,
            "model": getattr(model.config, "name_or_path", None) or type(model).__name__,
            "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
            "wall_time_s": round(wall, 2),
            "lm_eval_version": lm_eval.__version__,
            "eval_data": _data_provenance(prepared, loaded) if prepared else None,
        },
        "lm_eval": _json_ready({k: raw[k] for k in RAW_KEYS if k in raw}),
    }
    if log_samples:
        out["samples"] = _json_ready(raw.get("samples", {}))
    log.info("evaluated %s in %.1f s", ", ".join(names), wall)
    return out


def _data_provenance(prepared, loaded: dict) -> dict:
    """sha256 of the source and of each prepared file that the loaded tasks read."""
    root = prepared.root.as_posix()
    used = {}
    for task in loaded["tasks"].values():
        files = (task.config.dataset_kwargs or {}).get("data_files") or {}
        for path in files.values() if isinstance(files, dict) else [files]:
            rel = str(path).removeprefix(root + "/")
            if rel in prepared.manifest["files"]:
                used[rel] = prepared.manifest["files"][rel]["sha256"]
    return {
        "version": prepared.manifest["version"],
        "root": root,
        "sources": prepared.manifest["sources"],
        "files": dict(sorted(used.items())),
    }


def write_json(path: str | Path, obj: dict) -> Path:
    """Write ``obj`` as indented JSON through a temp file and a rename."""
    path = Path(path)
    eval_data.write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path


def results_table(out: dict) -> str:
    """lm-eval's Markdown table (plus its groups table) for an ``evaluate`` output."""
    from lm_eval.utils import make_table

    raw = out["lm_eval"]
    table = make_table(raw)
    if raw.get("groups"):
        table += "\n" + make_table(raw, "groups")
    return table
