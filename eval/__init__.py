"""sparamx's evaluation: lm-eval on an in-memory model, our offline tasks, result tables.

- ``evaluate(model, tokenizer, tasks, limit=None, batch_size=8)``: lm-eval metrics with
  stderr (``eval/runner.py``).
- Offline tasks (``eval/tasks/*.yaml``, data prepared from real text by ``eval/data.py``):
  ``lee_news_ppl`` (word perplexity on 300 news articles) and ``word_analogy_mc``
  (word-analogy multiple choice, one subtask per section). Any other name is an
  lm-eval task (``wikitext``, ``arc_easy``, ...), which needs the hub.
- ``compare_table`` / ``flatten_results``: dense vs pruned vs packed (``eval/compare.py``).
- ``python -m eval PATH --tasks ...``: the CLI (``eval/__main__.py``).

lm-eval is imported only when a function needs it, so importing this package is cheap.
"""

from .compare import compare_table, flatten_results
from .data import DataError
from .loading import ModelLoadError, load_for_eval
from .registry import UnknownTaskError, offline_tasks
from .runner import (
    EmptyTaskError,
    ResolvedTasks,
    TaskLoadError,
    clean_results,
    evaluate,
    resolve_tasks,
    results_table,
    write_json,
)

OFFLINE_TASKS = ("lee_news_ppl", "word_analogy_mc")

__all__ = [
    "OFFLINE_TASKS",
    "DataError",
    "EmptyTaskError",
    "ModelLoadError",
    "ResolvedTasks",
    "TaskLoadError",
    "load_for_eval",
    "resolve_tasks",
    "UnknownTaskError",
    "clean_results",
    "compare_table",
    "evaluate",
    "flatten_results",
    "offline_tasks",
    "results_table",
    "write_json",
]
