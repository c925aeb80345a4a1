"""Lay the results of several model variants (dense, pruned, packed) side by side.

``flatten_results`` accepts, per variant, an ``evaluate`` output, lm-eval's own output
(metric keys like ``acc,none``), an already-flat ``{task: {metric: value}}`` dict, or
the path of a JSON file written by ``python -m eval``. ``compare_table`` turns them
into a Markdown table with each variant's value (± stderr) and its change vs the
baseline (``dense`` when present).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import clean_results

# Metrics where lower is better; every other metric (acc, f1, ...) counts higher=better.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss", "error")


def _flat_one(res) -> dict[str, dict[str, float | None]]:
    if isinstance(res, (str, Path)):
        try:
            res = json.loads(Path(res).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read results file {res}: {e}") from e
    if not isinstance(res, dict):
        raise TypeError(f"results must be a dict or a JSON path, got {type(res).__name__}")
    if isinstance(res.get("results"), dict):
        res = res["results"]
    # lm-eval's raw keys carry the filter ("acc,none"); clean_results drops it.
    return clean_results({t: m for t, m in res.items() if isinstance(m, dict)})


def flatten_results(results_by_variant: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{variant: results}`` -> ``{variant: {task: {metric: value}}}`` (stderr included)."""
    return {variant: _flat_one(res) for variant, res in results_by_variant.items()}


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    # Perplexities run into the thousands when pruning goes wrong; 4 decimals there
    # only add noise.
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"


def _delta(v: float | None, base: float | None) -> str:
    if v is None or base is None:
        return "—"
    d = v - base
    rel = f" ({100 * d / abs(base):+.1f}%)" if base else ""
    return (f"{d:+,.1f}" if abs(d) >= 100 else f"{d:+.4f}") + rel


def compare_table(
    results_by_variant: dict,
    baseline: str | None = None,
    tasks: list[str] | None = None,
    metrics: list[str] | None = None,
    show_stderr: bool = True,
) -> str:
    """Markdown table: one row per (task, metric), one column per variant plus its delta.

    ``baseline`` defaults to ``"dense"`` if present, else the first variant. ``tasks``
    and ``metrics`` restrict the rows (default: every task and non-stderr metric).
    ↑/↓ after a metric says whether higher or lower is better.
    """
    flat = flatten_results(results_by_variant)
    if not flat:
        raise ValueError("compare_table needs at least one variant")
    variants = list(flat)
    if baseline is None:
        baseline = "dense" if "dense" in flat else variants[0]
    if baseline not in flat:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {variants}")
    others = [v for v in variants if v != baseline]

    rows: list[tuple[str, str]] = []
    for variant in [baseline, *others]:  # baseline's order first, then what others add
        for task, mets in flat[variant].items():
            if tasks is not None and task not in tasks:
                continue
            for metric in mets:
                if metric.endswith("_stderr") or (metrics is not None and metric not in metrics):
                    continue
                if (task, metric) not in rows:
                    rows.append((task, metric))

    header = ["Task", "Metric", baseline]
    for v in others:
        header += [v, f"Δ {v}"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for task, metric in rows:

        def cell(variant, task=task, metric=metric):
            mets = flat[variant].get(task, {})
            value, se = mets.get(metric), mets.get(f"{metric}_stderr")
            text = _fmt(value)
            return text + (
                f" ± {_fmt(se)}" if show_stderr and value is not None and se is not None else ""
            )

        base = flat[baseline].get(task, {}).get(metric)
        arrow = "↑" if higher_is_better(metric) else "↓"
        line = [task, f"{metric} {arrow}", cell(baseline)]
        for v in others:
            line += [cell(v), _delta(flat[v].get(task, {}).get(metric), base)]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"
