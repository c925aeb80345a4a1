"""Task names -> an lm-eval ``TaskManager`` that knows our offline tasks.

The YAMLs shipped in ``eval/tasks/`` are the source of truth. Their ``data_files``
hold the placeholder ``${EVAL_DATA}`` because the prepared data lives in the user's
cache, whose location varies. At run time each YAML is copied, with the placeholder
replaced by the prepared data directory, into ``<data root>/tasks/``, and that copy is
what lm-eval indexes (``TaskManager(include_path=...)``). Any other task name passes
straight through to lm-eval's own registry (``wikitext``, ``arc_easy``, ...).
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from pathlib import Path

import yaml

from .data import DataError, PreparedData, write_atomic

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
PLACEHOLDER = "${EVAL_DATA}"
# Some hub tasks for error messages; lm-eval knows thousands more.
HUB_EXAMPLES = ("wikitext", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")


class UnknownTaskError(ValueError):
    """A requested task is neither one of ours nor in lm-eval's registry."""


def shipped_yamls() -> dict[str, str]:
    """File name -> text of every YAML in ``eval/tasks/``."""
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(TASKS_DIR.glob("*.yaml"))}


@functools.cache
def offline_tasks() -> dict[str, str]:
    """Name -> kind (``task`` or ``group``) of every task/group the shipped YAMLs define."""
    names = {}
    for fname, text in shipped_yamls().items():
        # Our YAMLs use no lm-eval tags (!function), so plain safe_load parses them.
        cfg = yaml.safe_load(text) or {}
        for kind in ("group", "task"):
            if isinstance(cfg.get(kind), str):
                names[cfg[kind]] = kind
                break
        else:
            if not fname.startswith("_"):
                raise ValueError(f"eval/tasks/{fname} defines no task or group name")
    return names


def resolve_task_yamls(data: PreparedData) -> Path:
    """Write the shipped YAMLs with resolved data paths into ``data.root/tasks``.

    Every data file a YAML names must be one the manifest lists (so a shipped task
    without prepared data fails here, naming the task file). Returns the directory.
    """
    out = data.root / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    shipped = shipped_yamls()
    for fname, text in shipped.items():
        for rel in re.findall(re.escape(PLACEHOLDER) + r"/(\S+)", text):
            if rel not in data.manifest["files"]:
                raise DataError(
                    f"eval/tasks/{fname} reads {rel}, which the prepared eval "
                    f"data ({data.root}) does not have"
                )
        resolved = text.replace(PLACEHOLDER, data.root.as_posix())
        dest = out / fname
        # Rewrite only on change: other processes may be reading these files.
        if not dest.is_file() or dest.read_text(encoding="utf-8") != resolved:
            write_atomic(dest, resolved)
    for stale in set(p.name for p in out.glob("*.yaml")) - set(shipped):
        (out / stale).unlink(missing_ok=True)  # a task renamed or removed since
    return out


def split_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (stripped, no empties, no repeats)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise UnknownTaskError("no task given (e.g. --tasks lee_news_ppl,word_analogy_mc)")
    return names


def task_manager(names: list[str], data: PreparedData | None = None):
    """A ``TaskManager`` that can load every name in ``names``.

    lm-eval's built-in index takes ~10 s to build, so it is only included when a name
    is not one of ours. Unknown names raise ``UnknownTaskError`` listing close matches.
    """
    from lm_eval.tasks import TaskManager

    ours = offline_tasks()
    needs_hub = [n for n in names if n not in ours]
    include = None
    if len(needs_hub) < len(names):
        if data is None:
            raise ValueError("offline tasks need the prepared data (eval.data.prepare())")
        include = str(resolve_task_yamls(data))
    tm = TaskManager(include_path=include, include_defaults=bool(needs_hub))
    unknown = [n for n in needs_hub if n not in tm.all_tasks]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, [*ours, *tm.all_tasks], n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UnknownTaskError(
            f"unknown task {', '.join(hints)}; offline tasks: {', '.join(sorted(ours))}; "
            f"hub tasks are lm-eval task names, e.g. {', '.join(HUB_EXAMPLES)}"
        )
    return tm
