"""The report of a sweep's results folder, made from ``results.csv`` alone (so it can be
redone at any time: ``python -m sparamx.sweep --report DIR``):

- ``plots/tokens_per_s_vs_sparsity.png``: decode tokens/s per kernel and thread count
  (stock transformers dashed), one panel per (context, new tokens);
- ``plots/accuracy_vs_sparsity.png``: each evaluated metric per pruning method, dense
  dotted;
- ``plots/pareto.png``: the headline metric against tokens/s, Pareto front drawn;
- ``summary.md``: the results table, the best configuration per accuracy budget and
  per thread count, and the rows that were skipped or failed.

Accuracy budgets are relative losses of the headline metric against the dense model:
for an accuracy, (dense - acc) / dense; for a perplexity, (ppl - dense) / dense.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from pathlib import Path

from ..artifact import atomic_write_text

log = logging.getLogger(__name__)

BUDGETS = (0.01, 0.02, 0.05, 0.10, 0.25, 0.50, None)  # None: no accuracy limit
PLOTS = ("tokens_per_s_vs_sparsity.png", "accuracy_vs_sparsity.png", "pareto.png")


def _f(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def metric_columns(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    return [c for c in rows[0] if ":" in c and not c.startswith("dense:")]


def lower_is_better(column: str) -> bool:
    return "perplexity" in column.split(":", 1)[1]


def headline_metric(columns: list[str]) -> str | None:
    """The metric budgets refer to: the first accuracy-like one, else the first."""
    for c in columns:
        if not lower_is_better(c):
            return c
    return columns[0] if columns else None


def relative_loss(row: dict, column: str) -> float | None:
    v, d = _f(row.get(column)), _f(row.get("dense:" + column))
    if v is None or d is None or d == 0:
        return None
    return (v - d) / d if lower_is_better(column) else (d - v) / d


def pareto_front(points: list[tuple[float, float]], higher_y: bool = True) -> list[int]:
    """Indices of the points not dominated in (x up, y up or down), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: -points[i][0])
    front, best = [], None
    for i in order:
        y = points[i][1] if higher_y else -points[i][1]
        if best is None or y > best:
            front.append(i)
            best = y
    return sorted(front, key=lambda i: points[i][0])


def is_kv_row(row: dict) -> bool:
    """A row decoded with the sparse KV cache (kv_sparsity > 0)."""
    return bool(_f(row.get("kv_sparsity")))


def best_per_budget(rows: list[dict], column: str) -> list[dict]:
    """For each budget and thread count: the fastest ok row within the budget."""
    out = []
    threads = sorted({int(r["threads"]) for r in rows})
    for budget in BUDGETS:
        for t in threads:
            cands = [
                r
                for r in rows
                if int(r["threads"]) == t
                and _f(r.get("tokens_per_s")) is not None
                and (
                    budget is None
                    or (relative_loss(r, column) is not None and relative_loss(r, column) <= budget)
                )
            ]
            best = max(cands, key=lambda r: _f(r["tokens_per_s"]), default=None)
            out.append({"budget": budget, "threads": t, "row": best})
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v, fmt: str = ".3g") -> str:
    x = _f(v)
    return "–" if x is None else format(x, fmt)


def render_summary(out: Path, rows: list[dict], failed: list[dict], plots: list[str]) -> str:
    meta = {}
    if (out / "sweep.json").is_file():
        meta = json.loads((out / "sweep.json").read_text())
    sweep = meta.get("sweep", {})
    base = meta.get("base", {})
    cols = metric_columns(rows)
    head = headline_metric(cols)
    lines = [
        f"# Sweep {sweep.get('name', out.name)}: {out.name}",
        "",
        f"{len(rows)} experiments ok, {len(failed)} skipped or failed "
        f"(written {dt.datetime.now().isoformat(timespec='seconds')}).",
    ]
    if base:
        e, p = base.get("eval", {}), base.get("prune", {})
        lines.append(
            f"Eval: {', '.join(e.get('tasks', []))}, limit {e.get('limit')}; pruning "
            f"{p.get('granularity')} granularity, include {p.get('include')}, skip "
            f"{p.get('skip')}. Accuracy columns are the pruned model's (the packed model "
            "matches it: verify stage); speeds: sparse = `sparamx.generate`, stock = "
            "transformers `model.generate`, dense bf16."
        )
    lines += ["", "## Results", ""]
    lines += _results_section(rows, cols)
    kv_rows = [r for r in rows if is_kv_row(r)]
    if kv_rows:
        lines += _kv_section(kv_rows)
    rows = [r for r in rows if not is_kv_row(r)]
    if head and rows:
        lines += _budget_section(rows, head)
    if failed:
        lines += ["", "## Skipped or failed", ""]
        lines += [
            f"- {r['id']} ({r['method']} {r['sparsity']}, kernel {r['kernel']}, "
            f"{r['threads']} thr): {r['status']}"
            for r in failed
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"


def _results_section(rows: list[dict], cols: list[str]) -> list[str]:
    """The table of every finished experiment, and the dense model's metrics."""
    lines = []
    header = ["id", "model", "method", "sparsity", "KV s", "kernel", "threads", "ctx", "new"]
    header += [c.replace(":", " ") for c in cols]
    header += ["tok/s", "stock tok/s", "speed-up", "ms/token", "compile s"]
    with_load = any(r.get("load_avg") for r in rows)  # results from before the column
    if with_load:
        header.append("load avg")
    body = []
    for r in rows:
        body.append(
            [
                r["id"],
                r["model"],
                r["method"],
                r["sparsity"],
                r.get("kv_sparsity") or "0",
                r.get("kernel_used") or r["kernel"],
                r["threads"],
                r["context"],
                r["new_tokens"],
                *(_num(r.get(c), ".4g") for c in cols),
                _num(r.get("tokens_per_s"), ".1f"),
                _num(r.get("stock_tokens_per_s"), ".1f"),
                _num(r.get("speedup"), ".2f") + ("×" if _f(r.get("speedup")) else ""),
                _num(r.get("ms_per_token"), ".1f"),
                _num(r.get("compile_s"), ".0f"),
                *([_num(r.get("load_avg"), ".1f")] if with_load else []),
            ]
        )
    lines.append(_table(header, body) if body else "(no finished experiments)")
    if rows and cols:
        d0 = rows[0]
        dense = ", ".join(f"{c.replace(':', ' ')} {_num(d0.get('dense:' + c))}" for c in cols)
        lines += ["", f"Dense model ({rows[0]['model']}): {dense}."]
    return lines


def _kv_section(kv_rows: list[dict]) -> list[str]:
    """The rows that decode with the sparse KV cache: perplexity and memory."""
    lines = [
        "",
        "## Sparse KV cache",
        "",
        "Rows with kv_sparsity > 0 decode through `model.generate` with the sparse KV "
        "cache (K and V pruned at that sparsity; other settings from the base config's "
        "`kv` section). Decode-path perplexity (`eval.decode_ppl`: news text fed token "
        "by token) with it and with our dense cache, and its memory against the dense "
        "cache's. They are left out of the plots and budgets below, whose accuracy "
        "comes from lm-eval (prefill only).",
        "",
    ]
    body = []
    for r in kv_rows:
        ppl, dense = _f(r.get("kv_decode_ppl")), _f(r.get("kv_dense_decode_ppl"))
        change = f"{(ppl - dense) / dense:+.1%}" if ppl and dense else "–"
        body.append(
            [
                r["id"],
                f"{r['method']} {r['sparsity']}",
                f"{r.get('kv_method', '')} {r['kv_sparsity']}",
                f"{_num(ppl, '.4g')} ({change})",
                _num(dense, ".4g"),
                _num(r.get("kv_memory_ratio"), ".3f"),
                r["threads"],
                _num(r.get("tokens_per_s"), ".1f"),
            ]
        )
    cols_kv = ["id", "weights", "KV", "decode ppl", "dense-cache ppl", "KV memory", "threads"]
    lines.append(_table([*cols_kv, "tok/s"], body))
    return lines


def _budget_section(rows: list[dict], head: str) -> list[str]:
    """The fastest experiment within each accuracy budget, per thread count."""
    kind = "increase" if lower_is_better(head) else "loss"
    lines = [
        "",
        "## Best configuration per accuracy budget",
        "",
        f"Headline metric `{head}`; budget = largest relative {kind} against dense. "
        "Fastest experiment within each budget, per thread count: id, method, "
        "sparsity (metric, change vs dense) → decode tokens/s (speed-up vs stock).",
        "",
    ]
    # One row per budget, one column per thread count: "id: method sparsity
    # (metric, vs dense) -> tok/s (speed-up)".
    picks = best_per_budget(rows, head)
    threads = sorted({b["threads"] for b in picks})
    body = []
    for budget in BUDGETS:
        label = "any" if budget is None else f"≤ {budget:.0%}"
        cells = [label]
        for t in threads:
            r = next(b["row"] for b in picks if b["budget"] == budget and b["threads"] == t)
            if r is None:
                cells.append("none within budget")
                continue
            v, d, sp = _f(r.get(head)), _f(r.get("dense:" + head)), _f(r.get("speedup"))
            change = f"{(v - d) / d:+.1%}" if v is not None and d else "–"
            cells.append(
                f"{r['id']}: {r['method']} {r['sparsity']} ({_num(v, '.4g')}, {change}) → "
                f"{_num(r.get('tokens_per_s'), '.1f')} tok/s" + (f" ({sp:.2f}×)" if sp else "")
            )
        body.append(cells)
    lines.append(_table(["budget", *(f"{t} thread(s)" for t in threads)], body))
    return lines


def make_plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []
    if not rows:
        return made
    methods = sorted({r["method"] for r in rows})
    markers = dict(zip(methods, "osD^v<>", strict=False))

    # 1. tokens/s vs sparsity, one panel per (context, new tokens).
    panels = sorted({(int(r["context"]), int(r["new_tokens"])) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (ctx, new) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if int(r["context"]) == ctx and int(r["new_tokens"]) == new]
        series = defaultdict(list)
        for r in sub:
            series[(r.get("kernel_used") or r["kernel"], int(r["threads"]), r["method"])].append(r)
        colors = {}
        for (kernel, threads, method), rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: float(r["sparsity"]))
            color = colors.setdefault((kernel, threads), f"C{len(colors)}")
            ax.plot(
                [float(r["sparsity"]) for r in rs],
                [float(r["tokens_per_s"]) for r in rs],
                marker=markers[method],
                color=color,
                label=f"{kernel}, {threads} thr, {method}",
            )
        stock = {int(r["threads"]): _f(r.get("stock_tokens_per_s")) for r in sub}
        for t, v in sorted(stock.items()):
            if v:
                ax.axhline(v, ls="--", lw=1, color="grey")
                ax.annotate(f"stock, {t} thr", (ax.get_xlim()[0], v), fontsize=8, va="bottom")
        ax.set_xlabel("weight sparsity")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"context {ctx}, {new} new tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    made.append(_save(fig, out / PLOTS[0]))

    # 2. accuracy vs sparsity per method (one panel per metric).
    cols = metric_columns(rows)
    if cols:
        fig, axes = plt.subplots(1, len(cols), figsize=(5 * len(cols), 4), squeeze=False)
        for ax, col in zip(axes[0], cols, strict=True):
            per = defaultdict(dict)
            for r in rows:
                if _f(r.get(col)) is not None:
                    per[(r["model"], r["method"])][float(r["sparsity"])] = float(r[col])
            for (model, method), pts in sorted(per.items()):
                xs = sorted(pts)
                label = method if len({m for m, _ in per}) == 1 else f"{model} {method}"
                ax.plot(xs, [pts[x] for x in xs], marker=markers[method], label=label)
            dense = _f(rows[0].get("dense:" + col))
            if dense is not None:
                ax.axhline(dense, ls=":", color="black", label="dense")
            if lower_is_better(col):
                ax.set_yscale("log")
            ax.set_xlabel("weight sparsity")
            ax.set_ylabel(col.replace(":", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        made.append(_save(fig, out / PLOTS[1]))

    # 3. accuracy-speed Pareto front.
    head = headline_metric(cols)
    pts_rows = [r for r in rows if _f(r.get(head)) is not None and _f(r.get("tokens_per_s"))]
    if head and pts_rows:
        fig, ax = plt.subplots(figsize=(7, 5))
        pts = [(float(r["tokens_per_s"]), float(r[head])) for r in pts_rows]
        for method in methods:
            sel = [p for p, r in zip(pts, pts_rows, strict=True) if r["method"] == method]
            ax.scatter(*zip(*sel, strict=True), marker=markers[method], label=method)
        front = pareto_front(pts, higher_y=not lower_is_better(head))
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.plot(fx, fy, "k--", lw=1, label="Pareto front")
        for i in front:
            r = pts_rows[i]
            ax.annotate(
                f"{r['sparsity']}, {r['threads']}t",
                pts[i],
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
        stock = {int(r["threads"]): _f(r.get("stock_tokens_per_s")) for r in rows}
        dense = _f(rows[0].get("dense:" + head))
        for t, v in sorted(stock.items()):
            if v and dense is not None:
                ax.scatter([v], [dense], marker="*", s=120, color="grey")
                ax.annotate(
                    f"stock dense, {t}t",
                    (v, dense),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -10),
                )
        if lower_is_better(head):
            ax.set_yscale("log")
        ax.set_xlabel("decode tokens/s")
        ax.set_ylabel(head.replace(":", " "))
        ax.set_title("accuracy vs speed (sparse rows; stars: stock transformers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        made.append(_save(fig, out / PLOTS[2]))
    return made


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".part")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def write_sweep_report(out: Path) -> list[Path]:
    """Plots and ``summary.md`` for results folder ``out``; returns the files written."""
    from .results import read_results

    out = Path(out)
    all_rows = read_results(out / "results.csv")
    for r in all_rows:  # tables and plots tell "wanda" and "wanda+owl" apart
        if r.get("allocation") not in (None, "", "uniform"):
            r["method"] = f"{r['method']}+{r['allocation']}"
    rows = [r for r in all_rows if r.get("status") == "ok"]
    failed = [r for r in all_rows if r.get("status") != "ok"]
    # Plots and budgets compare weight sparsity: rows with the sparse KV cache (whose
    # accuracy cost shows on the decode path, not in the lm-eval columns) get a table.
    plots = make_plots([r for r in rows if not is_kv_row(r)], out / "plots")
    summary = out / "summary.md"
    atomic_write_text(summary, render_summary(out, rows, failed, plots))
    return [summary, *(out / "plots" / p for p in plots)]
