"""The run report: ``report/report.json`` (machine-readable), ``report/report.md``
(tables a person reads) and ``report/plots/*.png`` (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import atomic_write_json, atomic_write_text
from .pack import storage_counts
from .runstate import StageResult


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _flat_eval(res: dict | None) -> dict:
    """{task: {metric: value}} without stderr entries."""
    if not res:
        return {}
    return {
        t: {k: v for k, v in m.items() if not k.endswith("_stderr")}
        for t, m in res.get("results", {}).items()
    }


def environment() -> dict:
    """``sparamx.pipeline.bench.machine_record`` (CPU model, ISA class, kernels, threads,
    versions, command line) plus the CPU feature flags and lm-eval's version."""
    from ..ops import kernel_info
    from .bench import machine_record

    info = kernel_info()
    env = {
        **machine_record(),
        "cpu_flags": {k: v for k, v in info["cpu"].items()},
        "kernel_decode": info["decode"],
        "kernel_prefill": info["prefill"],
        "kernel_forced": info["forced"],
    }
    try:
        import lm_eval

        env["lm_eval"] = lm_eval.__version__
    except (ImportError, AttributeError):
        pass
    return env


def _cpu_model() -> str:
    from ..cpu import cpu_model_name

    return cpu_model_name()


def speedups(records: list[dict]) -> list[dict]:
    """Sparse over stock per thread count (the short prompts; weights only); ``flags``
    lists the warnings of either measurement, so a speed-up resting on a disturbed
    number is never shown bare."""
    out = []
    records = [r for r in records if r.get("context") is None]
    for t in sorted({r["threads"] for r in records}):
        s = [r for r in records if r["threads"] == t and r["model"] == "sparse"]
        d = [r for r in records if r["threads"] == t and r["model"] == "stock"]
        if s and d:
            out.append(
                {
                    "threads": t,
                    "decode_speedup": s[0]["tokens_per_s"] / d[0]["tokens_per_s"],
                    "ttft_speedup": d[0]["ttft_ms"] / s[0]["ttft_ms"],
                    "memory_ratio": s[0]["model_bytes"] / d[0]["model_bytes"],
                    "flags": [
                        f"{r['model']}: {f}" for r in (d[0], s[0]) for f in r.get("flags", [])
                    ],
                }
            )
    return out


def _flag_mark(flags) -> str:
    return " ⚠ FLAGGED" if flags else ""


def write_report(pipe) -> list[str]:
    """Gather the stage outputs of ``pipe``'s run directory into the report."""
    import eval as sx_eval

    run = pipe.run_dir
    evals = {
        "dense": _read(run / "eval" / "dense.json"),
        "pruned": _read(run / "eval" / "pruned.json"),
        "packed": _read(run / "eval-packed" / "packed.json"),
    }
    evals = {k: v for k, v in evals.items() if v}
    # A streaming run prunes inside the pack stage and writes its table there.
    prune = _read(run / "prune" / "layers.json") or _read(run / "pack" / "layers.json") or {}
    verify = _read(run / "verify" / "verify.json") or {}
    bench = (_read(run / "bench" / "bench.json") or {}).get("records", [])
    manifest = _read(run / "pack" / "artifact" / "sparamx.json") or {}
    source = _read(run / "load" / "source.json") or {}
    source.pop("config", None)
    for r in bench:
        r.pop("texts", None)
    report = {
        "artifact": str((run / "pack" / "artifact").resolve()),
        "eval": {k: _flat_eval(v) for k, v in evals.items()},
        "bench": bench,
        "speedups": speedups(bench),
        "config": pipe.cfg.to_dict(),
        "source": source,
        "prune": {k: v for k, v in prune.items() if k != "layers"},
        "layers": prune.get("layers", []),
        "packed_layers": manifest.get("layers", []),
        "packed_totals": manifest.get("totals", {}),
        "storage": {
            "requested": pipe.cfg.pack.storage,
            "layers": storage_counts(manifest.get("layers", [])),
        },
        "verify": {k: v for k, v in verify.items() if k != "layers"},
        "stages": pipe.state.data["stages"],
        "compute_dtype": pipe.compute.to_dict(),
        "environment": environment(),
    }
    out_dir = run / "report"
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = make_plots(report, out_dir / "plots")
    report["plots"] = [str(p.relative_to(out_dir)) for p in plots]
    atomic_write_json(out_dir / "report.json", report)
    table = sx_eval.compare_table(evals) if evals else "(no evaluation)"
    atomic_write_text(out_dir / "report.md", render_markdown(report, table))
    return ["report/report.json", "report/report.md", *(f"report/{p}" for p in report["plots"])]


def render_markdown(r: dict, eval_table: str) -> str:
    cfg, env = r["config"], r["environment"]
    p = cfg["prune"]
    lines = [
        f"# sparamx report: {cfg['name']}",
        "",
        f"- model: `{cfg['model']['source']}` ({r['source'].get('architecture', '?')}, "
        f"{r['source'].get('parameters', 0) / 1e6:.1f}M parameters, {cfg['model']['dtype']})",
        f"- pruning: {p['method']} {p['sparsity']:.0%} per {p['granularity']}, "
        f"calibration {_calibration_line(p)}, skip {p['skip']}",
        f"- artifact: `{r['artifact']}`",
        _storage_line(r.get("storage")),
        f"- CPU: {env['cpu_model']} (ISA class `{env.get('isa', '?')}`, "
        f"{env.get('cores', '?')} cores); kernels: decode `{env['kernel_decode']}`, prefill "
        f"`{env['kernel_prefill']}`; torch {env['torch']}, transformers "
        f"{env['transformers']}",
        _compute_line(r.get("compute_dtype")),
        f"- command: `{env.get('command', '?')}`",
        "",
        "## Accuracy (lm-eval)",
        "",
        f"Same tasks and settings for each variant: tasks {cfg['eval']['tasks']}, "
        f"limit {cfg['eval']['limit']}, batch size {cfg['eval']['batch_size']}.",
        "",
        eval_table,
        "",
    ]
    lines += _verify_section(r["verify"])
    if r["bench"]:
        lines += _bench_section(r, cfg["bench"])
    lines += _packed_section(r)
    lines += ["## Plots", ""] + [f"![{Path(pp).stem}]({pp})" for pp in r.get("plots", [])]
    lines += ["", "## Stages", "", "| stage | seconds | summary |", "|---|---:|---|"]
    for name, st in r["stages"].items():
        lines.append(f"| {name} | {st['seconds']:.1f} | {st['summary']} |")
    return "\n".join(lines) + "\n"


def _verify_section(v: dict | None) -> list[str]:
    """The verification section: a streaming run's weight check, or packed vs
    masked dense on real text."""
    if v and "tokens" not in v:  # a streaming run's check (no dense model in RAM)
        return [
            "## Verification (streaming: packed weights vs the source checkpoint)",
            "",
            f"Every packed linear holds the source's values where it keeps any: "
            f"{'yes' if v['weights_match'] else 'NO'}; packed kernel vs `F.linear` on the "
            f"unpacked weight, {v['rows']} random rows, worst relative error "
            f"{v['worst_layer_rel_l2']:.2e}: **{'passed' if v['passed'] else 'FAILED'}**.",
            "",
        ]
    elif v:
        u = v.get("vs_unquantized")
        quant = (
            []
            if not u
            else [
                f"The int8 layers are compared with their dequantized weights (q x scale); "
                f"against the unquantized masked model the logits differ by "
                f"{u['logits_rel_l2']:.2e} (relative L2), top-1 agreement "
                f"{u['top1_agreement']:.1%}: the quantization's own effect.",
                "",
            ]
        )
        return [
            "## Verification (packed vs masked dense, same tokens)",
            "",
            f"{v['tokens']} tokens of real text: logits relative L2 error "
            f"{v['logits_rel_l2']:.2e}, max abs {v['logits_max_abs']:.3g}, top-1 agreement "
            f"{v['top1_agreement']:.1%}, worst layer relative error "
            f"{v['worst_layer_rel_l2']:.2e}: **{'passed' if v['passed'] else 'FAILED'}**.",
            "",
            *quant,
        ]
    return []


def _bench_section(r: dict, b: dict) -> list[str]:
    """The decode-speed section: one row per timing, the speed-ups, the flags."""
    lines = [
        "## Decode speed (greedy `generate`, same prompts, same run)",
        "",
        f"{len(b['prompts'])} prompts x {b['repeats']} repeats, {b['new_tokens']} new "
        "tokens each, medians; one warm-up generation per process is not timed. "
        "`stock` = transformers dense (unpruned), computing in the `dtype` column's "
        "dtype; `sparse` = packed artifact (weights as packed, activations in that dtype) "
        "with a dense KV cache (weights only); `sparse+kv` = the same with the "
        "artifact's sparse KV cache. Loop: `hf` = `model.generate`, `lean` = "
        "`sparamx.generate` (static cache, compiled decode step; compile time in the "
        "warm-up, shown apart). Context: prompt tokens (a number: that many tokens "
        "of real text); KV MB: the cache at the end of a generation.",
        "",
        "| model | loop | dtype | threads | context | tokens/s | ms/token "
        "| ms/token min–max | TTFT ms | peak RSS MB "
        "| model MB | KV MB | kernel share | compile s | weights GB/s | of DRAM |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["bench"]:
        ks = x.get("kernel_share")
        bw = x.get("weight_gb_per_s")
        sp = x.get("ms_per_token_spread")
        rng = "-" if not sp else f"{sp['min']:.1f}–{sp['max']:.1f} ({sp['rel_spread']:.0%})"
        kvb = x.get("kv_bytes")
        ctx = x.get("context") or "prompts"
        lines.append(
            f"| {x['model']} | {x.get('engine', 'hf')} | {x.get('dtype', '?')} | "
            f"{x['threads']} | {ctx} | "
            f"{x['tokens_per_s']:.1f}{_flag_mark(x.get('flags'))} | "
            f"{x['ms_per_token']:.1f} | {rng} | {x['ttft_ms']:.0f} | {x['peak_rss_mb']:.0f} "
            f"| {x['model_bytes'] / 1e6:.0f} | {'-' if not kvb else f'{kvb / 1e6:.1f}'} | "
            f"{'-' if ks is None else f'{ks:.0%}'} | {x.get('compile_s', 0.0):.1f} | "
            f"{'-' if bw is None else f'{bw:.1f}'} | "
            f"{'-' if bw is None else format(x['bandwidth_fraction'], '.0%')} |"
        )
    lines += [
        "",
        "| threads | decode speed-up | TTFT speed-up | model memory ratio |",
        "|---:|---:|---:|---:|",
    ]
    for s in r["speedups"]:
        lines.append(
            f"| {s['threads']} | {s['decode_speedup']:.2f}x{_flag_mark(s.get('flags'))} | "
            f"{s['ttft_speedup']:.2f}x | {s['memory_ratio']:.2f} |"
        )
    lines.append("")
    warnings = [
        f"- **{x['model']} {x.get('engine', 'hf')}, {x['threads']} thread(s)**: {f}"
        for x in r["bench"]
        for f in x.get("flags", [])
    ]
    if warnings:
        lines += [
            "**Warning: flagged measurements** (repeats that disagree by more than "
            "20%, or a baseline slower with more threads): the numbers and speed-ups "
            "marked ⚠ are not to be trusted; rerun the bench stage on a quiet machine "
            "(`--force bench`).",
            "",
            *warnings,
            "",
        ]
    return lines


def _packed_section(r: dict) -> list[str]:
    """The packed layers' totals and the per-layer sparsity table."""
    lines = []
    t = r["packed_totals"]
    if t:
        lines += [
            "## Packed layers",
            "",
            f"{len(r['packed_layers'])} linears: {t['packed_bytes'] / 1e6:.1f} MB packed vs "
            f"{t['dense_bytes'] / 1e6:.1f} MB dense bf16 "
            f"({t['packed_bytes'] / t['dense_bytes']:.2f}x).",
            "",
        ]
    if r["layers"]:
        lines += ["| layer | shape | sparsity |", "|---|---|---:|"]
        for lay in r["layers"]:
            lines.append(
                f"| {lay['name']} | {lay['shape'][0]}x{lay['shape'][1]} | {lay['sparsity']:.1%} |"
            )
        lines.append("")
    return lines


def _storage_line(st: dict | None) -> str:
    """How the linears were packed: what the config asked for and what each layer got."""
    if not st:
        return "- packed storage: not recorded"
    got = ", ".join(f"{n} {s}" for s, n in st["layers"].items()) or "no layers packed"
    return f"- packed storage: **{st['requested']}** ({got})"


def _compute_line(c: dict | None) -> str:
    if not c:
        return "- compute dtype: not recorded"
    return (
        f"- compute dtype: **{c['resolved']}** (requested `{c['requested']}`; {c['reason']}): "
        "calibration, dense / pruned / packed evaluation, verification and the stock "
        "baseline compute in it; packed weights keep their storage's type (bf16 or int8)"
    )


def _calibration_line(p: dict) -> str:
    if p["method"] == "magnitude":
        return "none (magnitude)"
    c = p["calibration"]
    return f"{c['source']} {c['samples']} x {c['seqlen']} tokens, seed {c['seed']}"


def make_plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if r["layers"]:
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.bar(range(len(r["layers"])), [lay["sparsity"] for lay in r["layers"]], width=1.0)
        ax.set_xlabel("linear layer (model order)")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        ax.set_title("Per-layer sparsity")
        paths.append(_save(fig, out / "layer_sparsity.png"))
    if r["eval"]:
        metrics = sorted(
            {
                (t, m)
                for res in r["eval"].values()
                for t, ms in res.items()
                for m in ms
                if m in ("word_perplexity", "acc")
            }
        )
        if metrics:
            fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
            axes = [axes] if len(metrics) == 1 else axes
            for ax, (task, metric) in zip(axes, metrics, strict=True):
                names = [v for v in ("dense", "pruned", "packed") if v in r["eval"]]
                vals = [r["eval"][v].get(task, {}).get(metric) or 0 for v in names]
                ax.bar(names, vals, color=["#777", "#c84", "#48c"][: len(names)])
                ax.set_title(f"{task}\n{metric}")
                if "perplexity" in metric:
                    ax.set_yscale("log")
            fig.suptitle("Accuracy: dense vs pruned vs packed")
            paths.append(_save(fig, out / "accuracy.png"))
    if r["bench"]:
        threads = sorted({x["threads"] for x in r["bench"]})
        fig, ax = plt.subplots(figsize=(5, 3.5))
        width = 0.38
        for i, model in enumerate(("stock", "sparse")):
            ys = [
                next(
                    (
                        x["ms_per_token"]
                        for x in r["bench"]
                        if x["model"] == model and x["threads"] == t
                    ),
                    0,
                )
                for t in threads
            ]
            ax.bar([j + (i - 0.5) * width for j in range(len(threads))], ys, width, label=model)
        ax.set_xticks(range(len(threads)), [f"{t} thread(s)" for t in threads])
        ax.set_ylabel("ms per generated token")
        ax.set_title("Decode latency: stock vs sparse")
        ax.legend()
        paths.append(_save(fig, out / "latency.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------ the stage


def run_stage(pipe) -> StageResult:
    outputs = write_report(pipe)
    return StageResult(outputs, f"report at {pipe.run_dir / 'report' / 'report.md'}")
