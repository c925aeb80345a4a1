"""The ``sparamx`` command (``sparamx.cli``): every subcommand's help with an example,
delegated subcommands take their modules' own flags, ``info --json`` parses,
``generate`` streams a tiny random artifact's tokens, clear errors for bad artifact
paths; and the public API (``sparamx.__all__``) resolves, with the pure-Python names
usable without the native extension."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, zero_random_weights

import sparamx
from sparamx import cli

SUBCOMMANDS = ("run", "eval", "bench", "sweep", "demo", "generate", "info")
REPO = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` -> (exit status, stdout, stderr); argparse exits count too."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------ help


def test_top_level_help_lists_every_subcommand(capsys):
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    assert out.startswith("usage: sparamx")
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in out, name
    assert "example:" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    rc, _, err = run_cli([], capsys)
    assert rc == 2
    assert "usage: sparamx" in err


def test_version(capsys):
    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"sparamx {sparamx.__version__}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_names_itself_and_has_an_example(name, capsys):
    rc, out, _ = run_cli([name, "--help"], capsys)
    assert rc == 0
    assert out.startswith(f"usage: sparamx {name}"), out[:200]
    assert "python -m" not in out.split("\n\n")[0]  # the usage block names the new prog
    assert f"example:\n  sparamx {name} " in out


def test_delegated_help_shows_the_modules_own_flags(capsys):
    _, out, _ = run_cli(["run", "--help"], capsys)
    for flag in ("--set", "--out", "--only", "--force"):
        assert flag in out
    _, out, _ = run_cli(["eval", "-h"], capsys)
    assert "--tasks" in out and "--limit" in out


def test_retitle_help_reindents_wrapped_usage():
    text = (
        "usage: python -m sparamx.pipeline [-h] [--set KEY=VALUE]\n"
        "                                  [--out OUT]\n"
        "                                  config\n"
        "\n"
        "positional arguments:\n"
        "  config      YAML config\n"
    )
    new = cli._retitle_help(text, "python -m sparamx.pipeline", "sparamx run")
    lines = new.split("\n")
    assert lines[0] == "usage: sparamx run [-h] [--set KEY=VALUE]"
    assert lines[1] == " " * len("usage: sparamx run ") + "[--out OUT]"
    assert lines[2] == " " * len("usage: sparamx run ") + "config"
    assert lines[5] == "  config      YAML config"


# ------------------------------------------------------------------ delegation


def test_run_passes_set_to_the_pipeline(capsys, tmp_path):
    rc, _, err = run_cli(
        [
            "run",
            str(REPO / "configs" / "smollm2-135m.yaml"),
            "--set",
            "prune.method=obs",
            "--out",
            str(tmp_path / "never"),
        ],
        capsys,
    )
    assert rc == 2
    assert "prune.method" in err and "obs" in err
    assert not (tmp_path / "never").exists()


def test_run_missing_config_is_an_error(capsys, tmp_path):
    rc, _, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2
    assert "nope.yaml" in err


def test_eval_passes_its_arguments_to_eval(capsys, tmp_path):
    missing = tmp_path / "no_model"
    rc, _, err = run_cli(["eval", str(missing), "--tasks", "lee_news_ppl"], capsys)
    assert rc == 2
    assert str(missing) in err
    rc, _, err = run_cli(["eval", str(missing), "--limit", "0"], capsys)
    assert rc == 2
    assert "--limit must be positive" in err  # eval's own parser checked it


def test_bench_argument_errors_name_the_subcommand(capsys):
    rc, _, err = run_cli(["bench"], capsys)
    assert rc == 2
    assert "usage: sparamx bench" in err
    assert "--stock" in err


def test_delegation_restores_argv0(capsys):
    before = sys.argv[0]
    run_cli(["bench", "--help"], capsys)
    assert sys.argv[0] == before


# ------------------------------------------------------------------------ info


def test_info_json_parses_and_names_the_kernels(capsys):
    rc, out, _ = run_cli(["info", "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert info["versions"]["sparamx"] == sparamx.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["transformers"]
    assert info["cpu"]["model"] and info["cpu"]["cores"] >= 1
    assert info["native"]["built"] is True
    kinfo = sparamx.kernel_info()
    assert info["kernel_info"] == json.loads(json.dumps(kinfo))
    assert info["kernels"]["decode"] == kinfo["decode"]
    assert info["kernels"]["prefill"] == kinfo["prefill"]
    assert "portable" in info["native"]["compiled"]
    detected = {k for k, v in kinfo["cpu"].items() if v is True}
    assert set(info["isa"]["detected"]) == detected
    assert not set(info["isa"]["detected"]) & set(info["isa"]["missing"])


def test_info_text_shows_cpu_kernels_and_versions(capsys):
    rc, out, _ = run_cli(["info"], capsys)
    assert rc == 0
    kinfo = sparamx.kernel_info()
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    assert rows["kernel decode"] == kinfo["decode"]
    assert rows["kernel prefill"] == kinfo["prefill"]
    assert rows["cpu"].startswith(cli.cpu_model())
    assert rows["torch"] == torch.__version__
    assert rows["sparamx"] == sparamx.__version__


def test_info_follows_sparamx_kernel(capsys, monkeypatch):
    monkeypatch.setenv("SPARAMX_KERNEL", "portable")
    _, out, _ = run_cli(["info", "--json"], capsys)
    info = json.loads(out)
    assert info["forced"] == "portable"
    assert info["kernels"]["decode"] == "portable"
    assert info["kernels"]["prefill"] == "portable"
    _, out, _ = run_cli(["info"], capsys)
    assert "portable (forced)" in out


# -------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A tiny random Llama, 50% sparse, packed and saved with SmolLM2's tokenizer (the
    vocabulary is the tokenizer's, so that text prompts fit)."""
    from transformers import AutoModelForCausalLM

    from sparamx.models import load_model

    tokenizer = load_model("smollm2-135m")[1]
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    zero_random_weights(model, 0.5)
    sparamx.swap_linears(model)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    sparamx.save(model.eval(), tokenizer, path, recipe={"method": "magnitude", "sparsity": 0.5})
    return path


class _Recorder:
    """A stdout that remembers each write (to check that tokens are streamed)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def test_generate_streams_the_same_text_as_sparamx_generate(tiny_artifact, monkeypatch, capsys):
    prompt = "The history of the printing press begins"
    model, tokenizer = sparamx.load(tiny_artifact)
    ref = sparamx.generate(model, tokenizer, prompt, 12, compile=False)

    rec = _Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    threads = torch.get_num_threads()
    try:
        rc = cli.main(
            [
                "generate",
                str(tiny_artifact),
                prompt,
                "--max-new-tokens",
                "12",
                "--threads",
                "1",
                "--no-compile",
            ]
        )
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    err = capsys.readouterr().err
    assert rc == 0
    text = "".join(rec.writes)
    assert text == tokenizer.decode(ref.ids, skip_special_tokens=True) + "\n"
    assert len([w for w in rec.writes if w.strip()]) > 1, "text was not streamed piece by piece"
    assert "tokens" in err and "attention exact" in err and "1 threads" in err


def test_generate_fast_attention(tiny_artifact, capsys):
    rc, out, err = run_cli(
        ["generate", str(tiny_artifact), "Hello", "--max-new-tokens", "4", "--attention", "fast"],
        capsys,
    )
    assert rc == 0
    assert out.endswith("\n")
    assert "attention fast" in err and "compile" in err


def test_generate_missing_artifact_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no" / "artifact"
    rc, out, err = run_cli(["generate", str(missing), "Hello"], capsys)
    assert rc == 2 and out == ""
    assert str(missing) in err and "no such directory" in err and "sparamx run" in err


def test_generate_on_a_directory_that_is_not_an_artifact(tmp_path, capsys):
    rc, _, err = run_cli(["generate", str(tmp_path), "Hello"], capsys)
    assert rc == 2
    assert "not a sparamx artifact (no sparamx.json)" in err


def test_generate_on_a_file(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    rc, _, err = run_cli(["generate", str(f), "Hello"], capsys)
    assert rc == 2 and "not a directory" in err


def test_generate_on_a_corrupt_artifact(tiny_artifact, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    (bad / "sparamx.json").write_text("{ not json")
    rc, _, err = run_cli(["generate", str(bad), "Hello"], capsys)
    assert rc == 2 and "corrupt manifest" in err


@pytest.mark.parametrize("flag", [["--max-new-tokens", "0"], ["--threads", "-1"]])
def test_generate_rejects_non_positive_numbers(tiny_artifact, flag, capsys):
    rc, _, err = run_cli(["generate", str(tiny_artifact), "Hello", *flag], capsys)
    assert rc == 2 and "positive integer" in err


def test_generate_empty_prompt(tiny_artifact, capsys):
    rc, _, err = run_cli(["generate", str(tiny_artifact), "  "], capsys)
    assert rc == 2 and "prompt is empty" in err


# ------------------------------------------------------------------ public API


def test_every_public_name_resolves():
    assert len(set(sparamx.__all__)) == len(sparamx.__all__)
    for name in sparamx.__all__:
        assert getattr(sparamx, name) is not None, name
    for name in ("load", "save", "generate", "swap_linears", "pack", "kernel_info"):
        assert callable(getattr(sparamx, name)), name
    for name in ("SparseLinear", "DenseLinear", "PackedWeight"):
        assert isinstance(getattr(sparamx, name), type), name
    assert issubclass(sparamx.DenseLinear, sparamx.SparseLinear)
    assert issubclass(sparamx.ArtifactError, Exception)
    assert set(sparamx.__all__) <= set(dir(sparamx))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sparamx.not_a_name  # noqa: B018


def test_pure_python_parts_work_without_the_native_extension():
    """With ``sparamx._C`` unimportable, the format works, native names fail with the
    build hint, and ``sparamx info`` reports the missing build instead of crashing."""
    code = (
        "import sys, json\n"
        "sys.modules['sparamx._C'] = None\n"
        "import torch, sparamx\n"
        "w = torch.randn(32, 64).to(torch.bfloat16)\n"
        "assert torch.equal(sparamx.pack(w).unpack(), w)\n"
        "try:\n"
        "    sparamx.SparseLinear\n"
        "except ImportError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('SparseLinear imported without the extension')\n"
        "from sparamx.cli import collect_info\n"
        "info = collect_info()\n"
        "assert info['native']['built'] is False and 'not built' in info['native']['error']\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_python_dash_m_sparamx_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "sparamx", "info", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["versions"]["sparamx"] == sparamx.__version__
