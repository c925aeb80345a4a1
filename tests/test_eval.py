"""Tests of eval/: offline task data, task resolution, lm-eval runs, CLI and tables.

Tests marked slow run lm-eval (on a tiny random Llama with SmolLM2's tokenizer, or on
the real SmolLM2-135M) with a small ``limit``; the rest take seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from eval import data as eval_data
from eval.__main__ import main
from eval.compare import compare_table, flatten_results
from eval.registry import PLACEHOLDER, UnknownTaskError, offline_tasks, resolve_task_yamls
from eval.runner import EmptyTaskError, clean_results, evaluate, resolve_tasks, results_table

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = 14
ANALOGIES = 19544


@pytest.fixture(scope="module")
def sources():
    from sparamx.assets import gensim_text

    return gensim_text(eval_data.LEE_SOURCE), gensim_text(eval_data.ANALOGY_SOURCE)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from sparamx.models import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[0])
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny_model(smollm2_tokenizer):
    """A tiny random Llama whose vocabulary matches the real SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(smollm2_tokenizer))
    return AutoModelForCausalLM.from_config(cfg).eval()


# --------------------------------------------------------------------------- data


def test_preparation_is_deterministic_and_checksummed(tmp_path, sources):
    first = eval_data.prepare_into(tmp_path / "a", *sources)
    second = eval_data.prepare_into(tmp_path / "b", *sources)
    assert first == second  # same sha256 for every source and prepared file
    for rel in first["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (
        first["sources"][eval_data.LEE_SOURCE]["sha256"]
        == eval_data.SOURCE_SHA256[eval_data.LEE_SOURCE]
    )
    assert first["files"][eval_data.LEE_FILE]["docs"] == 300
    analogy_files = [r for r in first["files"] if r.startswith(eval_data.ANALOGY_DIR)]
    assert len(analogy_files) == SECTIONS
    assert sum(first["files"][r]["docs"] for r in analogy_files) == ANALOGIES
    assert eval_data.verify(tmp_path / "a") == first
    # The cache the tasks use was prepared the same way.
    assert eval_data.prepare().manifest["files"] == first["files"]


def test_analogy_choices_hold_the_answer_and_same_section_distractors(sources):
    sections = eval_data.parse_analogies(sources[1])
    assert len(sections) == SECTIONS
    for name, questions in sections.items():
        pool = {q[3] for q in questions}
        rows = eval_data.analogy_rows(name, questions)
        assert len(rows) == len(questions)
        for row in rows:
            assert row["choices"][row["label"]] == row["answer"]
            assert len(set(row["choices"])) == eval_data.ANALOGY_CHOICES
            assert set(row["choices"]) <= pool
            assert not {row["a"], row["b"], row["c"]} & set(row["choices"])
        # Shuffled: the gold answer is not always in the same slot.
        assert len({r["label"] for r in rows}) == eval_data.ANALOGY_CHOICES


def test_corrupt_prepared_file_is_detected(tmp_path, sources):
    eval_data.prepare_into(tmp_path, *sources)
    target = tmp_path / eval_data.ANALOGY_DIR / "family.jsonl"
    target.write_text(target.read_text() + "\n")
    with pytest.raises(eval_data.DataError, match="family.jsonl"):
        eval_data.verify(tmp_path)


def test_source_with_wrong_checksum_is_refused(tmp_path, sources):
    fake = tmp_path / "lee.cor"
    fake.write_text("An article that is not in gensim.\n")
    with pytest.raises(eval_data.DataError, match="lee_background.cor"):
        eval_data.prepare_into(tmp_path / "out", fake, sources[1])


@pytest.mark.parametrize("which", ["lee", "analogy"])
def test_empty_source_is_a_clear_error(tmp_path, sources, which):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    lee, analogy = (empty, sources[1]) if which == "lee" else (sources[0], empty)
    task = "lee_news_ppl" if which == "lee" else "word_analogy_mc"
    with pytest.raises(eval_data.DataError, match=f"{task}.*empty dataset"):
        eval_data.prepare_into(tmp_path / "out", lee, analogy, expected_sources=None)


# --------------------------------------------------------------------------- tasks


def test_shipped_yamls_define_one_subtask_per_section():
    import yaml

    from eval.registry import TASKS_DIR

    tasks = offline_tasks()
    assert tasks["lee_news_ppl"] == "task" and tasks["word_analogy_mc"] == "group"
    prepared = eval_data.prepare()
    sections = [Path(r).stem for r in prepared.manifest["files"] if r.startswith("word_analogy/")]
    subtasks = [f"word_analogy_mc_{s.replace('-', '_')}" for s in sections]
    assert len(subtasks) == SECTIONS and set(subtasks) <= set(tasks)
    group = yaml.safe_load((TASKS_DIR / "word_analogy_mc.yaml").read_text())
    assert sorted(group["task"]) == sorted(subtasks)
    resolved = resolve_task_yamls(prepared)
    assert sorted(p.name for p in resolved.glob("*.yaml")) == sorted(
        p.name for p in TASKS_DIR.glob("*.yaml")
    )
    for path in resolved.glob("*.yaml"):
        text = path.read_text()
        assert PLACEHOLDER not in text
        assert "data_files" not in text or str(prepared.root) in text


def test_unknown_task_is_named_with_suggestions():
    with pytest.raises(UnknownTaskError, match="'lee_news_pl'.*lee_news_ppl"):
        resolve_tasks("lee_news_pl")


def test_hub_tasks_pass_through_to_lm_eval():
    from eval.runner import TaskLoadError, load_tasks

    resolved = resolve_tasks("lee_news_ppl,wikitext")  # lm-eval's registry knows wikitext
    assert resolved.names == ("lee_news_ppl", "wikitext")
    try:
        loaded = load_tasks(resolved)
    except TaskLoadError as e:
        # Offline (no hub, no cached copy): the error says which task and why.
        assert "wikitext" in str(e) and "hub" in str(e)
    else:
        assert "wikitext" in loaded["tasks"]


def test_empty_task_dataset_is_named(tmp_path):
    from lm_eval.tasks import TaskManager

    from eval.runner import ResolvedTasks, load_tasks

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "my_empty_task.yaml").write_text(
        "task: my_empty_task\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {tmp_path / 'empty.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\n"
        "doc_to_text: ''\ndoc_to_target: text\n"
    )
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(EmptyTaskError, match="my_empty_task.*empty"):
        load_tasks(ResolvedTasks(("my_empty_task",), tm, None))


def test_limit_of_zero_is_refused(tiny_model, smollm2_tokenizer):
    with pytest.raises(EmptyTaskError, match="limit"):
        evaluate(tiny_model, smollm2_tokenizer, "lee_news_ppl", limit=0)


def test_clean_results_keeps_lm_eval_metric_names():
    raw = {
        "t": {
            "alias": "t",
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "word_perplexity,none": 70.0,
            "word_perplexity_stderr,none": "N/A",
            "exact_match,strict-match": 0.25,
        }
    }
    assert clean_results(raw) == {
        "t": {
            "acc": 0.5,
            "acc_stderr": 0.1,
            "word_perplexity": 70.0,
            "word_perplexity_stderr": None,
            "exact_match,strict-match": 0.25,
        }
    }


# --------------------------------------------------------------------------- compare


def test_compare_table_shows_values_and_deltas_vs_dense(tmp_path):
    dense = {"results": {"ppl": {"word_perplexity": 70.0}, "mc": {"acc": 0.8, "acc_stderr": 0.01}}}
    pruned = {"results": {"ppl": {"word_perplexity,none": 250.0}, "mc": {"acc,none": 0.68}}}
    path = tmp_path / "packed.json"
    path.write_text(json.dumps({"results": {"mc": {"acc": 0.67}}}))
    flat = flatten_results({"dense": dense, "pruned": pruned, "packed": path})
    assert flat["pruned"] == {"ppl": {"word_perplexity": 250.0}, "mc": {"acc": 0.68}}
    table = compare_table({"pruned": pruned, "dense": dense, "packed": path})
    lines = table.strip().splitlines()
    assert lines[0] == "| Task | Metric | dense | pruned | Δ pruned | packed | Δ packed |"
    assert "| ppl | word_perplexity ↓ | 70.0000 | 250.0 | +180.0 (+257.1%) | — | — |" in lines
    assert "| mc | acc ↑ | 0.8000 ± 0.0100 | 0.6800 | -0.1200 (-15.0%) | 0.6700 |" in table
    with pytest.raises(ValueError, match="baseline"):
        compare_table({"a": dense}, baseline="dense2")


# --------------------------------------------------------------------------- CLI errors


def test_cli_unreadable_model_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main([str(missing), "--tasks", "lee_news_ppl"]) == 2
    assert str(missing) in capsys.readouterr().err
    not_a_model = tmp_path / "empty_dir"
    not_a_model.mkdir()
    assert main([str(not_a_model), "--tasks", "lee_news_ppl"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_wrong_task_is_named_before_loading_the_model(tmp_path, capsys):
    assert main([str(tmp_path / "never_loaded"), "--tasks", "lee_news_ppl,not_a_task"]) == 2
    err = capsys.readouterr().err
    assert "not_a_task" in err and "never_loaded" not in err


def test_cli_artifact_without_sparamx_load_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # sparamx imports ``load`` lazily from sparamx.artifact: make that import fail.
    monkeypatch.setitem(sys.modules, "sparamx.artifact", None)
    (tmp_path / "sparamx.json").write_text("{}")
    assert main([str(tmp_path), "--tasks", "lee_news_ppl"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "sparamx.load" in err


# --------------------------------------------------------------------------- lm-eval runs


def _check_offline_results(out, n_docs):
    res = out["results"]
    lee = res["lee_news_ppl"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(lee)
    assert lee["word_perplexity"] > 1 and lee["word_perplexity_stderr"] is None
    mc = res["word_analogy_mc"]
    assert 0 <= mc["acc"] <= 1 and mc["acc_stderr"] is not None
    sections = [t for t in res if t.startswith("word_analogy_mc_")]
    assert len(sections) == SECTIONS
    assert out["lm_eval"]["n-samples"]["lee_news_ppl"]["effective"] == n_docs
    assert (
        out["meta"]["eval_data"]["files"]["lee_news.jsonl"]
        == (eval_data.prepare().manifest["files"]["lee_news.jsonl"]["sha256"])
    )
    table = results_table(out)
    assert "word_perplexity" in table and "family" in table


@pytest.mark.slow
def test_offline_tasks_run_on_a_tiny_random_model(tiny_model, smollm2_tokenizer):
    out = evaluate(
        tiny_model, smollm2_tokenizer, ["lee_news_ppl", "word_analogy_mc"], limit=2, batch_size=8
    )
    _check_offline_results(out, 2)
    # Random weights: perplexity far above the real model's ≈70.
    assert out["results"]["lee_news_ppl"]["word_perplexity"] > 1000


@pytest.mark.slow
def test_offline_tasks_run_on_smollm2(smollm2):
    model, tok = smollm2
    out = evaluate(model, tok, "lee_news_ppl,word_analogy_mc", limit=3, batch_size=8)
    _check_offline_results(out, 3)
    # Real weights: ≈71 perplexity and ≈0.78 accuracy on the full sets.
    assert out["results"]["lee_news_ppl"]["word_perplexity"] < 200
    assert out["results"]["word_analogy_mc"]["acc"] > 0.5


@pytest.mark.slow
def test_cli_on_a_packed_artifact_writes_results_json(
    tmp_path, tiny_model, smollm2_tokenizer, monkeypatch, capsys
):
    import sparamx

    loaded = []

    def fake_load(path):  # stands in for sparamx.load until it exists
        loaded.append(Path(path))
        return tiny_model, smollm2_tokenizer

    monkeypatch.setattr(sparamx, "load", fake_load, raising=False)
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "sparamx.json").write_text("{}")
    out = tmp_path / "results.json"
    argv = [str(art), "--tasks", "word_analogy_mc_family", "--limit", "2", "--output", str(out)]
    assert main(argv) == 0
    assert loaded == [art]
    assert "family" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res["results"]["word_analogy_mc_family"]) >= {"acc", "acc_stderr"}
    assert res["meta"]["source"] == str(art)


@pytest.mark.slow
def test_cli_subprocess_on_a_hf_directory(tmp_path, tiny_model, smollm2_tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "eval", str(model_dir), "--tasks", "lee_news_ppl"]
    cmd += ["--limit", "2", "--batch-size", "4", "--dtype", "float32", "--output", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "word_perplexity" in proc.stdout
    res = json.loads(out.read_text())
    assert res["results"]["lee_news_ppl"]["word_perplexity"] > 1
    assert res["meta"]["limit"] == 2 and res["meta"]["dtype"] == "float32"


@pytest.mark.slow
def test_cli_on_a_real_sparamx_artifact_matches_dense(tmp_path, tiny_model, smollm2_tokenizer):
    import copy

    import sparamx

    try:
        swap_linears, save = sparamx.swap_linears, sparamx.save
    except (AttributeError, ImportError) as e:
        pytest.skip(f"sparamx artifacts not available: {e}")
    dense = copy.deepcopy(tiny_model).to(torch.bfloat16)
    dense_out = evaluate(dense, smollm2_tokenizer, "lee_news_ppl", limit=2)
    packed = copy.deepcopy(dense)
    swap_linears(packed)
    art = save(packed, smollm2_tokenizer, tmp_path / "artifact")
    out = tmp_path / "packed.json"
    # bf16 like the dense run (the CLI's default, auto, is fp32 on CPUs without a fast
    # bf16 matmul).
    args = [str(art), "--tasks", "lee_news_ppl", "--limit", "2", "--dtype", "bfloat16"]
    assert main([*args, "--output", str(out)]) == 0
    packed_out = json.loads(out.read_text())
    ppl = [r["results"]["lee_news_ppl"]["word_perplexity"] for r in (dense_out, packed_out)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-2)
    table = compare_table({"dense": dense_out, "packed": out}, tasks=["lee_news_ppl"])
    assert "| lee_news_ppl | word_perplexity ↓ |" in table
