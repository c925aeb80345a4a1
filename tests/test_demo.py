"""The side-by-side demo: the two models taking turns on one thread, the
non-interactive ``--no-live`` report, ``--no-stock``, bad arguments."""

import threading

import pytest
import torch
from conftest import tiny_config

from sparamx.cpu import resolve_compute_dtype
from sparamx.tools import demo


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A tiny random Llama (saved as its own source dir), pruned 50% and packed."""
    from transformers import AutoModelForCausalLM

    import pruning
    from sparamx.artifact import save
    from sparamx.layers import swap_linears
    from sparamx.models import load_model, source_record

    _, tok = load_model("smollm2-135m")
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    root = tmp_path_factory.mktemp("demo")
    src = root / "source"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    pruning.prune(model, "magnitude", 0.5, progress=False)
    swap_linears(model, include=["*"], exclude=[])
    art = root / "artifact"
    save(
        model,
        tok,
        art,
        source=source_record(str(src), str(src), None),
        recipe={"method": "magnitude", "sparsity": 0.5},
    )
    return art


def test_lane_rate_leaves_out_the_first_token():
    lane = demo.Lane("x", durations=[5.0, 0.1, 0.1, 0.2])
    assert lane.tokens == 4
    assert lane.tokens_per_s == pytest.approx(3 / 0.4)
    assert demo.Lane("y", durations=[1.0]).tokens_per_s is None


def test_race_advances_both_columns_together(tiny_artifact):
    sparse, tok, dense, desc = demo.load_models(tiny_artifact, True, None, "bfloat16")
    assert desc == "magnitude 50%"
    snapshots = []
    lanes = {demo.STOCK: demo.Lane("stock"), demo.SPARSE: demo.Lane("sparse")}

    def on_change():
        snapshots.append((lanes[demo.STOCK].tokens, lanes[demo.SPARSE].tokens))
        callers.add(threading.get_ident())

    callers: set[int] = set()
    before = threading.active_count()
    demo.race(sparse, dense, tok, "Hello there", 6, 1, on_change, lanes, compile=False)
    # Both models ran on this thread (a second thread gets its own OpenMP team, slower)
    assert callers == {threading.get_ident()} and threading.active_count() == before
    assert lanes[demo.STOCK].tokens == 6 and lanes[demo.SPARSE].tokens == 6
    # Turn by turn: neither column is ever more than one token ahead.
    assert all(abs(a - b) <= 1 for a, b in snapshots)
    assert lanes[demo.STOCK].text and lanes[demo.SPARSE].text
    assert lanes[demo.STOCK].tokens_per_s > 0 and lanes[demo.SPARSE].tokens_per_s > 0
    # The live view renders (rich) with both columns and the speed-up.
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(demo.render(lanes, "Hello there", "1 thread(s)"))
    shown = console.export_text()
    assert "stock" in shown and "sparse" in shown and "speed-up" in shown


def test_no_live_prints_both_texts_and_speeds(tiny_artifact, capsys):
    assert demo.main([str(tiny_artifact), "--no-live", "--no-compile", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"prompt: {demo.DEFAULT_PROMPT}"
    # the stock lane names the compute dtype ``auto`` resolved to on this CPU
    dtype = resolve_compute_dtype("auto").resolved
    stock = [ln for ln in lines if ln.startswith(f"== stock transformers ({dtype}): 5 tokens, ")]
    sparse = [ln for ln in lines if ln.startswith("== sparamx packed (magnitude 50%, ")]
    assert len(stock) == 1 and len(sparse) == 1
    assert stock[0].endswith("tokens/s") and sparse[0].endswith("tokens/s")
    # Each header is followed by that model's generated text.
    assert lines[lines.index(stock[0]) + 1].strip()
    assert lines[lines.index(sparse[0]) + 1].strip()
    assert lines[-1].startswith("speed-up (sparse / stock tokens/s): ")
    assert float(lines[-1].split(": ")[1].rstrip("x")) > 0


def test_no_stock_runs_the_sparse_model_alone(tiny_artifact, capsys):
    args = [str(tiny_artifact), "--no-live", "--no-stock", "--no-compile", "--tokens", "4"]
    assert demo.main([*args, "--prompt", "Once upon a time"]) == 0
    out = capsys.readouterr().out
    assert "prompt: Once upon a time" in out
    assert "stock transformers" not in out and "speed-up" not in out
    assert "== sparamx packed (magnitude 50%" in out


@pytest.mark.slow
def test_no_live_with_the_compiled_step(tiny_artifact, capsys):
    assert demo.main([str(tiny_artifact), "--no-live", "--tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "sparse step compiled in" in out and "speed-up" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--tokens", "1"], "--tokens must be >= 2"),
        (["--prompt", " "], "--prompt is empty"),
    ],
)
def test_bad_arguments(tiny_artifact, capsys, args, message):
    with pytest.raises(SystemExit):
        demo.main([str(tiny_artifact), *args])
    assert message in capsys.readouterr().err


def test_missing_artifact(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main([str(tmp_path / "nope")])
    assert "is not a directory" in capsys.readouterr().err
