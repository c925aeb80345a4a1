"""Sweeps: grid expansion and its errors, the experiments.csv round trip (plan -> edit ->
run), appending and resuming results (including after a SIGKILL), skipped kernels, the
report. Orchestration tests replace the four heavy steps (dense eval, artifact, sparse
and stock timing) with light fakes; one slow test runs everything on a tiny model."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sparamx.sweep import grid as sweep_grid
from sparamx.sweep import report as sweep_report
from sparamx.sweep import results as sweep_results
from sparamx.sweep import runner as sw

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, grid=None, **extra) -> Path:
    data = {
        "name": "t",
        "output_dir": str(tmp_path / "results"),
        "set": ["eval.limit=2"],
        "grid": grid
        or {
            "method": ["magnitude", "wanda"],
            "sparsity": [0.3, 0.6],
            "threads": [1, 2],
        },
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ fakes

CALLS: list[tuple] = []


def fake_dense(self, model):
    CALLS.append(("dense", model))
    return {
        "results": {"lee_news_ppl": {"word_perplexity": 70.0}, "word_analogy_mc": {"acc": 0.8}},
        "meta": {"tasks": ["lee_news_ppl", "word_analogy_mc"]},
    }


def fake_artifact(self, exp):
    CALLS.append(("artifact", exp.artifact_settings()))
    s = exp.sparsity + (0.05 if exp.method == "magnitude" else 0.0)
    return {
        "path": self.out / "artifacts" / f"{exp.method}-{exp.sparsity}" / "pack" / "artifact",
        "pruned": {
            "results": {
                "lee_news_ppl": {"word_perplexity": 70.0 * (1 + 4 * s)},
                "word_analogy_mc": {"acc": 0.8 * (1 - s)},
            }
        },
        "actual_sparsity": exp.sparsity,
    }


def fake_sparse(self, exp, artifact):
    CALLS.append(("sparse", exp.id))
    # Faster with more zeros; the magnitude fake prunes a little more (see fake_artifact).
    s = exp.sparsity + (0.05 if exp.method == "magnitude" else 0.0)
    tps = 20.0 * (1 + s) * exp.threads
    return {
        "tokens_per_s": tps,
        "ms_per_token": 1e3 / tps,
        "ttft_ms": 50.0,
        "compile_s": 1.0,
        "peak_rss_mb": 500.0,
        "model_bytes": 1000,
        "prompt_tokens": exp.context,
    }


def fake_stock(self, exp):
    CALLS.append(("stock", exp.threads))
    return {"tokens_per_s": 10.0 * exp.threads}


@pytest.fixture
def fakes(monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(sw.Sweep, "dense_eval", fake_dense)
    monkeypatch.setattr(sw.Sweep, "artifact", fake_artifact)
    monkeypatch.setattr(sw.Sweep, "time_sparse", fake_sparse)
    monkeypatch.setattr(sw.Sweep, "time_stock", fake_stock)
    monkeypatch.setattr(sw, "kernel_unavailable", lambda k: None)
    return CALLS


def results_of(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def only_dir(parent: Path) -> Path:
    dirs = [d for d in parent.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ------------------------------------------------------------------ grid


def test_grid_expands_every_combination_artifact_axes_outermost(tmp_path):
    sweep, base = sweep_grid.load_sweep(write_sweep(tmp_path))
    exps = sweep_grid.expand_grid(sweep)
    assert len(exps) == 2 * 2 * 2
    assert [e.id for e in exps] == [f"e{i:02d}" for i in range(1, 9)]
    assert len({e.key() for e in exps}) == 8
    # Experiments sharing an artifact are adjacent (run-time axes vary fastest).
    settings = [e.artifact_settings() for e in exps]
    assert settings == sorted(settings, key=settings.index)
    assert [e.threads for e in exps[:2]] == [1, 2]
    assert exps[0].model == "smollm2-135m" and exps[0].kernel == "auto"
    assert exps[0].allocation == "uniform"
    assert base.eval.limit == 2  # `set` reached the base config


def test_allocation_axis_gives_its_own_artifacts_and_old_plans_read_as_uniform(tmp_path):
    sweep, _ = sweep_grid.load_sweep(write_sweep(tmp_path))
    sweep.grid.allocation = ["uniform", "owl"]
    exps = sweep_grid.expand_grid(sweep)
    assert len(exps) == 16 and {e.allocation for e in exps} == {"uniform", "owl"}
    assert len({e.artifact_settings() for e in exps}) == 8
    plan = tmp_path / "old.csv"
    cols = [c for c in sweep_grid.PLAN_COLUMNS if c != "allocation"]
    plan.write_text(",".join(cols) + "\n" + ",".join(exps[0].as_row()[c] for c in cols) + "\n")
    (old,) = sweep_grid.read_plan(plan)
    assert old.allocation == "uniform" and old.key() == exps[0].key()


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            {"method": ["obs"]},
            r"grid.method\[0\]: 'obs' is not one of magnitude, wanda, ria, sparsegpt",
        ),
        (
            {"allocation": ["even"]},
            r"grid.allocation\[0\]: 'even' is not one of uniform, owl",
        ),
        ({"sparsity": [0.5, 1.0]}, r"grid.sparsity\[1\]: 1.0 is out of range"),
        ({"sparsity": ["half"]}, r"grid.sparsity\[0\]: expected a number"),
        ({"kv_sparsity": [0, 1.0]}, r"grid.kv_sparsity\[1\]: 1.0 is out of range"),
        (
            {"kernel": ["sse2"]},
            r"grid.kernel\[0\]: 'sse2' is not one of auto, amx, avx512, avx2, portable",
        ),
        ({"threads": [0]}, r"grid.threads\[0\]: 0 is out of range"),
        ({"new_tokens": [1]}, r"grid.new_tokens\[0\]: 1 is out of range"),
        ({"threads": []}, r"grid.threads: empty list"),
        ({"threads": [1, 1]}, r"grid.threads: repeated values"),
        ({"colour": ["red"]}, r"unknown field grid.colour"),
    ],
)
def test_bad_grid_fields_are_named(tmp_path, grid, message):
    with pytest.raises(sweep_grid.SweepError, match=message):
        sweep_grid.load_sweep(write_sweep(tmp_path, grid=grid))


def test_bad_base_fields_are_named(tmp_path):
    with pytest.raises(sweep_grid.SweepError, match="base: pipeline config 'nope.yaml' not found"):
        sweep_grid.load_sweep(write_sweep(tmp_path, base="nope.yaml"))
    with pytest.raises(sweep_grid.SweepError, match="prune.method"):
        sweep_grid.load_sweep(write_sweep(tmp_path, set=["prune.method=foo"]))


def test_kv_sparsity_rows_take_the_base_kv_settings(tmp_path):
    grid = {"kv_sparsity": [0, 0.4]}
    sweep, base = sweep_grid.load_sweep(write_sweep(tmp_path, grid=grid, set=["kv.sink_tokens=8"]))
    s = sw.Sweep.create(sweep, base, tmp_path / "out")
    none, half = sweep_grid.expand_grid(sweep)
    assert s.kv_settings(none) is None
    kv = s.kv_settings(half)
    assert kv["method"] == "magnitude" and kv["k_sparsity"] == kv["v_sparsity"] == 0.4
    assert kv["sink_tokens"] == 8
    # artifacts carry no KV settings, whatever the base says (rows set them at run time)
    sweep, base = sweep_grid.load_sweep(write_sweep(tmp_path, grid=grid, set=["kv.method=wanda"]))
    s = sw.Sweep.create(sweep, base, tmp_path / "out2")
    assert s.kv_settings(sweep_grid.expand_grid(sweep)[1])["method"] == "wanda"
    assert s.base_for(half).kv.method == "none"


def test_rows_are_timed_with_the_base_decode_loop_kv_rows_too(tmp_path, monkeypatch):
    import sparamx.pipeline.bench

    grid = {"kv_sparsity": [0, 0.5]}
    sweep, base = sweep_grid.load_sweep(
        write_sweep(tmp_path, grid=grid, set=["bench.engine=lean-fast"])
    )
    s = sw.Sweep.create(sweep, base, tmp_path / "out")
    engines = []
    monkeypatch.setattr(
        sparamx.pipeline.bench, "bench_subprocess", lambda *a, **kw: engines.append(a[7]) or {}
    )
    for exp in sweep_grid.expand_grid(sweep):
        s.time_sparse(exp, tmp_path)
    assert engines == ["lean-fast", "lean-fast"]


def test_shipped_sweep_is_the_issue_grid():
    sweep, base = sweep_grid.load_sweep(REPO / "configs" / "sweeps" / "smollm2-135m.yaml")
    exps = sweep_grid.expand_grid(sweep)
    assert len(exps) == 12
    assert {e.sparsity for e in exps} == {0.3, 0.5, 0.7}
    assert {e.method for e in exps} == {"magnitude", "wanda"}
    assert {e.threads for e in exps} == {1, 2}
    assert base.eval.tasks == ["lee_news_ppl", "word_analogy_mc"]


# ------------------------------------------------------------------ CSV round trip


def test_plan_csv_round_trip(tmp_path):
    sweep, _ = sweep_grid.load_sweep(write_sweep(tmp_path))
    exps = sweep_grid.expand_grid(sweep)
    path = tmp_path / "experiments.csv"
    sweep_grid.write_plan(path, exps)
    assert sweep_grid.read_plan(path) == exps


def fake_kv_eval(self, exp, artifact, kv):
    CALLS.append(("kv_eval", exp.id, kv["method"], kv["k_sparsity"]))
    return {
        "results": {
            "none": {"ppl": 20.0},
            kv["method"]: {"ppl": 20.0 * (1 + kv["k_sparsity"] / 10), "memory_ratio": 0.6},
        }
    }


def test_kv_sparsity_rows_decode_with_the_sparse_kv_cache(tmp_path, fakes, monkeypatch):
    monkeypatch.setattr(sw.Sweep, "kv_eval", fake_kv_eval)
    timed = []
    monkeypatch.setattr(
        sw.Sweep,
        "time_sparse",
        lambda self, exp, art: timed.append(self.kv_settings(exp)) or fake_sparse(self, exp, art),
    )
    grid = {"method": ["wanda"], "sparsity": [0.5], "kv_sparsity": [0, 0.5]}
    assert sw.main([str(write_sweep(tmp_path, grid=grid)), "--no-progress"]) == 0
    got = results_of(only_dir(tmp_path / "results"))
    assert [r["kv_sparsity"] for r in got] == ["0", "0.5"]
    assert got[0]["kv_decode_ppl"] == "" and got[0]["kv_method"] == ""
    assert got[1]["kv_method"] == "magnitude"
    assert float(got[1]["kv_decode_ppl"]) == pytest.approx(21.0)
    assert float(got[1]["kv_dense_decode_ppl"]) == 20.0
    assert float(got[1]["kv_memory_ratio"]) == 0.6
    assert timed[0] is None and timed[1]["k_sparsity"] == 0.5
    assert [c for c in fakes if c[0] == "kv_eval"] == [("kv_eval", "e02", "magnitude", 0.5)]
    summary = (only_dir(tmp_path / "results") / "summary.md").read_text()
    kv_part = summary.split("## Sparse KV cache")[1]
    assert "| e02 | wanda 0.5 | magnitude 0.5 | 21 (+5.0%) | 20 | 0.600 |" in kv_part
    assert "e02" not in kv_part.split("## Best configuration")[1]  # budgets: weights only


def test_plan_edit_then_run_runs_exactly_the_edited_rows(tmp_path, fakes):
    cfg = write_sweep(tmp_path)
    plan = tmp_path / "experiments.csv"
    assert sw.main([str(cfg), "--plan", "--csv", str(plan)]) == 0
    rows = list(csv.DictReader(plan.open()))
    assert len(rows) == 8
    # Edit: keep the wanda rows only, change one to 0.7 sparsity, add a portable row.
    rows = [r for r in rows if r["method"] == "wanda"]
    rows[0]["sparsity"] = "0.7"
    rows.append({**rows[1], "id": "extra", "kernel": "portable"})
    with plan.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert sw.main([str(cfg), "--from-csv", str(plan), "--no-progress"]) == 0
    out = only_dir(tmp_path / "results")
    got = results_of(out)
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    assert got[0]["sparsity"] == "0.7" and got[-1]["kernel"] == "portable"
    assert all(r["status"] == "ok" for r in got)
    assert all(float(r["load_avg"]) >= 0 for r in got)
    assert {r["method"] for r in got} == {"wanda"}
    # The plan as run is kept next to the results (what --resume reads).
    assert [e.id for e in sweep_grid.read_plan(out / "experiments.csv")] == [r["id"] for r in rows]
    # Artifacts: one per (model, method, sparsity), not per row.
    assert len([c for c in fakes if c[0] == "artifact"]) == len(got)  # the fake is uncached
    assert {c[1] for c in fakes if c[0] == "artifact"} == {
        ("smollm2-135m", "wanda", "uniform", 0.7),
        ("smollm2-135m", "wanda", "uniform", 0.3),
        ("smollm2-135m", "wanda", "uniform", 0.6),
    }
    # Speed-up against the stock timing of the same thread count.
    r = got[1]
    assert float(r["speedup"]) == pytest.approx(
        float(r["tokens_per_s"]) / float(r["stock_tokens_per_s"]), rel=1e-3
    )
    assert (out / "summary.md").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace("magnitude,uniform,0.3", "magnitud,uniform,0.3", 1),
            r"line 2 \(id e01\) column method",
        ),
        (lambda t: t.replace(",0.3,0,", ",0.3,1.5,", 1), r"line 2 \(id e01\) column kv_sparsity"),
        (lambda t: t.replace("e02", "e01"), r"id 'e01' is used twice"),
        (lambda t: t.replace("threads", "thread"), r"misses threads.*unknown columns thread"),
        (lambda t: t.replace(",1,32,64\n", ",1,32\n", 1), r"line 2: 9 fields, the header has 10"),
        (lambda t: t.replace("uniform", "even", 1), r"line 2 \(id e01\) column allocation"),
    ],
)
def test_edited_plan_errors_name_line_and_column(tmp_path, edit, message):
    sweep, _ = sweep_grid.load_sweep(write_sweep(tmp_path))
    path = tmp_path / "experiments.csv"
    sweep_grid.write_plan(path, sweep_grid.expand_grid(sweep))
    path.write_text(edit(path.read_text()))
    with pytest.raises(sweep_grid.SweepError, match=message):
        sweep_grid.read_plan(path)


# ------------------------------------------------------------------ resume


def test_resume_skips_finished_rows_and_drops_a_partial_line(tmp_path, fakes, monkeypatch):
    cfg = write_sweep(tmp_path)
    real_run_one = sw.Sweep.run_one

    def dies_on_fourth(self, exp):
        if exp.id == "e04":
            raise KeyboardInterrupt  # the sweep is stopped while e04 runs
        return real_run_one(self, exp)

    monkeypatch.setattr(sw.Sweep, "run_one", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        sw.main([str(cfg), "--no-progress"])
    out = only_dir(tmp_path / "results")
    assert [r["id"] for r in results_of(out)] == ["e01", "e02", "e03"]
    # A crash in the middle of writing e04's line leaves half a line behind.
    with open(out / "results.csv", "a") as f:
        f.write("e04,smollm2-135m,magnitude,0.6,0,au")
    monkeypatch.setattr(sw.Sweep, "run_one", real_run_one)
    fakes.clear()
    assert sw.main(["--resume", str(out), "--no-progress"]) == 0
    assert [c[1] for c in fakes if c[0] == "sparse"] == ["e04", "e05", "e06", "e07", "e08"]
    got = results_of(out)
    assert [r["id"] for r in got] == [f"e{i:02d}" for i in range(1, 9)]
    assert all(r["status"] == "ok" for r in got)
    # A second resume has nothing left to do.
    fakes.clear()
    assert sw.main(["--resume", str(out), "--no-progress"]) == 0
    assert not [c for c in fakes if c[0] == "sparse"]
    assert len(results_of(out)) == 8


KILLED_SCRIPT = """
import sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import test_sweep as t
from sparamx.sweep import runner as sw

def slow_sparse(self, exp, artifact):
    if exp.id == "e03":
        time.sleep(600)  # killed here
    return t.fake_sparse(self, exp, artifact)

sw.Sweep.dense_eval = t.fake_dense
sw.Sweep.artifact = t.fake_artifact
sw.Sweep.time_sparse = slow_sparse
sw.Sweep.time_stock = t.fake_stock
sw.kernel_unavailable = lambda k: None
sys.exit(sw.main([{cfg!r}, "--no-progress"]))
"""


def test_resume_after_sigkill(tmp_path, fakes):
    cfg = write_sweep(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(KILLED_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), cfg=str(cfg)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            res = list((tmp_path / "results").glob("*/results.csv"))
            if res and res[0].read_text().count("\n") >= 3:  # header + e01 + e02
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the sweep did not finish two rows in 120 s")
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    out = only_dir(tmp_path / "results")
    assert [r["id"] for r in results_of(out)] == ["e01", "e02"]
    assert sw.main(["--resume", str(out), "--no-progress"]) == 0
    assert [c[1] for c in fakes if c[0] == "sparse"] == [f"e{i:02d}" for i in range(3, 9)]
    assert [r["id"] for r in results_of(out)] == [f"e{i:02d}" for i in range(1, 9)]


def test_unavailable_kernel_rows_are_skipped_then_retried(tmp_path, fakes, monkeypatch):
    cfg = write_sweep(tmp_path, grid={"kernel": ["avx512", "amx"], "threads": [1]})
    monkeypatch.setattr(
        sw, "kernel_unavailable", lambda k: "this CPU cannot run kernel amx" if k == "amx" else None
    )
    assert sw.main([str(cfg), "--no-progress"]) == 0
    out = only_dir(tmp_path / "results")
    got = results_of(out)
    assert got[0]["status"] == "ok"
    assert got[1]["status"] == "skipped: this CPU cannot run kernel amx"
    assert "this CPU cannot run kernel amx" in (out / "summary.md").read_text()
    # On a machine that has the kernel, a resume runs the skipped row (once).
    monkeypatch.setattr(sw, "kernel_unavailable", lambda k: None)
    assert sw.main(["--resume", str(out), "--no-progress"]) == 0
    got = results_of(out)
    assert [(r["id"], r["status"]) for r in got] == [("e01", "ok"), ("e02", "ok")]


def test_a_failing_row_is_recorded_and_the_sweep_goes_on(tmp_path, fakes, monkeypatch):
    cfg = write_sweep(tmp_path, grid={"sparsity": [0.3, 0.6]})

    def broken(self, exp, artifact):
        if exp.sparsity == 0.3:
            raise RuntimeError("bench of sparse model failed")
        return fake_sparse(self, exp, artifact)

    monkeypatch.setattr(sw.Sweep, "time_sparse", broken)
    assert sw.main([str(cfg), "--no-progress"]) == 0
    got = results_of(only_dir(tmp_path / "results"))
    assert got[0]["status"] == "error: RuntimeError: bench of sparse model failed"
    assert got[1]["status"] == "ok"


def test_real_kernel_availability_check():
    from sparamx.ops import kernel_info

    assert sw.kernel_unavailable("portable") is None
    assert sw.kernel_unavailable("auto") is None
    cpu = kernel_info()["cpu"]
    if cpu.get("amx_bf16") and cpu.get("os_amx"):
        assert sw.kernel_unavailable("amx") is None
    else:
        assert "cannot run kernel amx" in sw.kernel_unavailable("amx")


# ------------------------------------------------------------------ report


def test_report_plots_and_best_per_budget(tmp_path, fakes):
    cfg = write_sweep(tmp_path, grid={"method": ["magnitude", "wanda"], "sparsity": [0.3, 0.6]})
    assert sw.main([str(cfg), "--no-progress"]) == 0
    out = only_dir(tmp_path / "results")
    for name in sweep_report.PLOTS:
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = [r for r in sweep_results.read_results(out / "results.csv")]
    head = sweep_report.headline_metric(sweep_report.metric_columns(rows))
    assert head == "word_analogy_mc:acc"
    best = {b["budget"]: b["row"] for b in sweep_report.best_per_budget(rows, head)}
    # acc = 0.8 (1 - s'), s' = sparsity (+0.05 for magnitude): loss = s'.
    assert best[0.25] is None  # nothing loses less than 30%
    # Within 50%: wanda 0.3 (loss 0.30) and magnitude 0.3 (0.35, faster); the faster
    # wanda 0.6 (0.60) is out.
    assert (best[0.5]["method"], best[0.5]["sparsity"]) == ("magnitude", "0.3")
    assert (best[None]["method"], best[None]["sparsity"]) == ("magnitude", "0.6")
    text = (out / "summary.md").read_text()
    assert "## Best configuration per accuracy budget" in text
    assert "![pareto.png](plots/pareto.png)" in text
    # --report rebuilds the same files from results.csv alone.
    (out / "summary.md").unlink()
    assert sw.main(["--report", str(out)]) == 0
    assert (out / "summary.md").read_text().count("| e0") >= 4


def test_pareto_front():
    pts = [(10, 0.8), (20, 0.7), (15, 0.6), (30, 0.3), (25, 0.2)]
    assert sweep_report.pareto_front(pts) == [0, 1, 3]
    # Lower is better (perplexity): (10, 5) and (30, 9) dominate (20, 12).
    assert sweep_report.pareto_front([(10, 5), (20, 12), (30, 9)], higher_y=False) == [0, 2]


# ------------------------------------------------------------------ real run


@pytest.mark.slow
def test_real_sweep_on_a_tiny_model(tmp_path):
    """Prune, eval, pack, verify and a timed lean decode in a subprocess, for real; a
    second row decodes with the sparse KV cache (model.generate) and measures its
    decode-path perplexity."""
    model_dir = _tiny_model(tmp_path)
    cfg = write_sweep(
        tmp_path,
        grid={
            "model": [str(model_dir)],
            "method": ["magnitude"],
            "sparsity": [0.5],
            "threads": [1],
            "kernel": ["portable"],
            "context": [8],
            "new_tokens": [3],
            "kv_sparsity": [0, 0.5],
        },
        set=["eval.limit=1", "eval.tasks=[lee_news_ppl]", "eval.batch_size=2"],
        bench={"repeats": 1},
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sparamx.sweep", str(cfg), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = only_dir(tmp_path / "results")
    row, kv_row = results_of(out)
    assert kv_row["status"] == "ok", kv_row["status"]
    assert kv_row["artifact"] == row["artifact"]  # one artifact, two run-time settings
    assert kv_row["kv_method"] == "magnitude" and float(kv_row["tokens_per_s"]) > 0
    assert float(kv_row["kv_decode_ppl"]) > 0 and float(kv_row["kv_dense_decode_ppl"]) > 0
    assert 0 < float(kv_row["kv_memory_ratio"]) < 1
    assert row["kv_decode_ppl"] == ""
    assert row["status"] == "ok", row["status"]
    assert row["kernel_used"] == "portable"
    assert float(row["actual_sparsity"]) == pytest.approx(0.5, abs=0.01)
    assert float(row["tokens_per_s"]) > 0 and float(row["stock_tokens_per_s"]) > 0
    assert float(row["lee_news_ppl:word_perplexity"]) > 0
    art = out / row["artifact"]
    assert json.loads((art / "sparamx.json").read_text())["layers"]
    assert json.loads((art.parents[1] / "verify" / "verify.json").read_text())["passed"]
    assert (out / "summary.md").is_file()


def _tiny_model(tmp_path) -> Path:
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from sparamx.models import load_model

    _, tok = load_model("smollm2-135m")
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_context_prompt_has_exactly_the_asked_tokens():
    from sparamx.models import load_model
    from sparamx.pipeline.bench import context_prompt

    _, tok = load_model("smollm2-135m")
    for n in (1, 32, 300, 8192):  # 8192: past the first text, into the second
        ids = context_prompt(tok, n)
        assert tuple(ids.shape) == (1, n)
    assert torch_equal_prefix(context_prompt(tok, 32), context_prompt(tok, 300))
    assert torch_equal_prefix(context_prompt(tok, 300), context_prompt(tok, 8192))
    with pytest.raises(ValueError, match="context must be >= 1"):
        context_prompt(tok, 0)
    with pytest.raises(ValueError, match="longer than the text"):
        context_prompt(tok, 10**6)


def torch_equal_prefix(a, b) -> bool:
    return bool((a[0] == b[0, : a.shape[1]]).all())


def test_bench_refuses_kv_settings_for_the_stock_model():
    from sparamx.pipeline.bench import run_bench

    with pytest.raises(ValueError, match="kv settings need a packed artifact"):
        run_bench("stock", "unused", 1, ["x"], 2, 1, kv={"method": "magnitude"})
