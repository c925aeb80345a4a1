"""The compute dtype by CPU (sparamx.cpu), its config field, the packed model's
activation dtype, and the benchmark records' environment, spreads and flags."""

import json

import pytest
import torch

from sparamx import cpu
from sparamx.pipeline.config import ConfigError, load_config


@pytest.fixture
def isa(monkeypatch):
    """Pretend to run on a CPU of the given ISA class (the one helper the rest asks)."""

    def set_isa(name: str):
        monkeypatch.setattr(cpu, "cpu_isa", lambda: name)

    return set_isa


@pytest.mark.parametrize(
    "name, fast", [("amx", True), ("avx512-bf16", True), ("avx2", False), ("portable", False)]
)
def test_auto_is_bf16_only_where_bf16_matmul_is_fast(isa, name, fast):
    isa(name)
    c = cpu.resolve_compute_dtype("auto")
    assert c.resolved == ("bfloat16" if fast else "float32")
    assert c.requested == "auto" and c.isa == name
    assert name in c.reason
    assert cpu.has_fast_bf16_matmul() is fast


@pytest.mark.parametrize("name", ["amx", "avx2"])
@pytest.mark.parametrize("forced", ["bfloat16", "float32"])
def test_forced_compute_dtype_wins_on_any_cpu(isa, name, forced):
    isa(name)
    c = cpu.resolve_compute_dtype(forced)
    assert c.resolved == forced and c.requested == forced
    assert "set to" in c.reason


def test_auto_keeps_an_fp32_model_in_fp32(isa):
    # Old configs with model.dtype: float32 asked for fp32 precision; auto keeps it even
    # where bf16 would be faster.
    isa("amx")
    c = cpu.resolve_compute_dtype("auto", weights_dtype="float32")
    assert c.resolved == "float32" and "model.dtype" in c.reason


def test_resolve_rejects_unknown_values():
    with pytest.raises(ValueError, match="'float16' is not one of auto, bfloat16, float32"):
        cpu.resolve_compute_dtype("float16")


def test_isa_from_features_needs_the_os_state():
    base = {"avx512f": True, "avx512_bf16": True, "avx2": True, "fma": True}
    assert cpu.isa_from_features({**base, "os_avx512": True}) == "avx512-bf16"
    # AVX-512 in CPUID but zmm state not saved by the OS: unusable, so AVX2.
    assert cpu.isa_from_features({**base, "os_avx512": False}) == "avx2"
    amx = {**base, "os_avx512": True, "amx_tile": True, "amx_bf16": True}
    assert cpu.isa_from_features({**amx, "os_amx": True}) == "amx"
    assert cpu.isa_from_features({**amx, "os_amx": False}) == "avx512-bf16"
    assert cpu.isa_from_features({"avx2": False}) == "portable"


def test_this_cpu_has_a_known_isa_class_and_name():
    assert cpu.cpu_isa() in cpu.ISA_CLASSES
    assert cpu.cpu_model_name()


def test_config_compute_dtype_field():
    assert load_config(None).model.compute_dtype == "auto"
    for v in ("bfloat16", "float32", "auto"):
        assert load_config(None, [f"model.compute_dtype={v}"]).model.compute_dtype == v
    with pytest.raises(
        ConfigError, match="model.compute_dtype: 'fp16' is not one of auto, bfloat16, float32"
    ):
        load_config(None, ["model.compute_dtype=fp16"])
    # Old configs (no compute_dtype, model.dtype float32) still load.
    assert load_config(None, ["model.dtype=float32"]).model.compute_dtype == "auto"


# ------------------------------------------------------------ packed model dtype


def test_packed_model_runs_its_other_parts_in_fp32(tiny_llama):
    from sparamx.layers import PackedEmbedding, SparseLinear, set_activation_dtype, swap_linears

    tiny_llama.config.tie_word_embeddings = True
    tiny_llama.tie_weights()
    tiny_llama.to(torch.bfloat16)
    swap_linears(tiny_llama, exclude=[])  # lm_head too: the embedding shares its copy
    assert isinstance(tiny_llama.get_input_embeddings(), PackedEmbedding)
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = tiny_llama(ids).logits.float()
    values = {n: m.values for n, m in tiny_llama.named_modules() if isinstance(m, SparseLinear)}
    set_activation_dtype(tiny_llama, torch.float32)
    assert tiny_llama.dtype == torch.float32
    for n, m in tiny_llama.named_modules():
        if isinstance(m, SparseLinear):
            assert m.values is values[n] and m.values.dtype == torch.bfloat16  # untouched
    with torch.inference_mode():
        out = tiny_llama(ids).logits
    assert out.dtype == torch.float32
    # Same weights, wider arithmetic: close to the bf16 model's logits.
    assert (out - ref).norm() / ref.norm() < 0.05


def test_set_activation_dtype_keeps_tied_parameters_tied(tiny_llama):
    from sparamx.layers import set_activation_dtype, swap_linears

    tiny_llama.config.tie_word_embeddings = True
    tiny_llama.tie_weights()
    tiny_llama.to(torch.bfloat16)
    swap_linears(tiny_llama, include=["*.mlp.*"])  # lm_head and embedding stay nn modules
    inv_freq = tiny_llama.model.rotary_emb.inv_freq
    set_activation_dtype(tiny_llama, torch.float32)
    head, emb = tiny_llama.get_output_embeddings(), tiny_llama.get_input_embeddings()
    assert head.weight is emb.weight and emb.weight.dtype == torch.float32
    # A non-persistent buffer (rotary frequencies, computed by transformers) is left alone.
    assert tiny_llama.model.rotary_emb.inv_freq is inv_freq


# ------------------------------------------------------------ bench records


def test_machine_record_names_the_cpu_and_the_kernels():
    from sparamx.pipeline.bench import machine_record

    rec = machine_record(threads=2)
    assert rec["cpu_model"] and rec["isa"] in cpu.ISA_CLASSES
    assert rec["threads"] == 2
    assert {"decode", "prefill"} <= set(rec["kernels"])
    assert rec["torch"] == torch.__version__ and rec["transformers"]
    assert "python" in rec["command"] or "pytest" in rec["command"]
    json.dumps(rec)  # JSON-ready


def test_spread_flags_repeats_that_disagree():
    from sparamx.pipeline.bench import spread, spread_flags

    calm = spread([10.0, 10.5, 11.0])
    assert calm["min"] == 10.0 and calm["median"] == 10.5 and calm["max"] == 11.0
    assert spread_flags("x", calm) == []
    noisy = spread([10.0, 10.5, 14.0])  # (14 - 10) / 10.5 = 38%
    (flag,) = spread_flags("stock 2 thr", noisy)
    assert "38%" in flag and "stock 2 thr" in flag
    assert spread_flags("one", spread([5.0])) == []


def test_thread_scaling_flags_a_baseline_slower_with_two_threads():
    from sparamx.pipeline.bench import thread_scaling_flags

    recs = [
        {"model": "stock", "threads": 1, "tokens_per_s": 17.1, "flags": []},
        {"model": "stock", "threads": 2, "tokens_per_s": 3.6, "flags": []},
    ]
    thread_scaling_flags(recs, key=lambda r: r["model"], what="stock transformers")
    assert recs[0]["flags"] == []
    assert "slower with 2 threads" in recs[1]["flags"][0]
    fine = [
        {"model": "stock", "threads": 1, "tokens_per_s": 15.0},
        {"model": "stock", "threads": 2, "tokens_per_s": 17.3},
    ]
    thread_scaling_flags(fine, key=lambda r: r["model"])
    assert not any(r.get("flags") for r in fine)


def test_report_never_shows_a_flagged_speedup_bare():
    from sparamx.pipeline.report import render_markdown, speedups

    def rec(model, threads, tps, flags=()):
        return {
            "model": model,
            "engine": "hf" if model == "stock" else "lean",
            "threads": threads,
            "tokens_per_s": tps,
            "ms_per_token": 1e3 / tps,
            "ttft_ms": 50.0,
            "peak_rss_mb": 500.0,
            "model_bytes": 2e8 if model == "stock" else 1e8,
            "flags": list(flags),
        }

    bench = [
        rec("stock", 1, 17.1),
        rec("sparse", 1, 70.0),
        rec("stock", 2, 3.6, ["stock transformers slower with 2 threads"]),
        rec("sparse", 2, 71.3),
    ]
    s = speedups(bench)
    assert s[0]["flags"] == [] and s[1]["flags"]
    report = {
        "config": load_config(None).to_dict(),
        "environment": {
            "cpu_model": "AMD EPYC",
            "isa": "avx2",
            "kernel_decode": "portable",
            "kernel_prefill": "portable",
            "torch": "x",
            "transformers": "y",
        },
        "source": {},
        "artifact": "a",
        "verify": {},
        "bench": bench,
        "speedups": s,
        "packed_totals": {},
        "layers": [],
        "stages": {},
        "compute_dtype": cpu.resolve_compute_dtype("float32").to_dict(),
    }
    md = render_markdown(report, "")
    line = next(x for x in md.splitlines() if x.startswith("| 2 | 19.81x"))
    assert "FLAGGED" in line
    assert "| 1 | 4.09x |" in md  # the unflagged one stays plain
    assert "slower with 2 threads" in md
    assert "compute dtype: **float32**" in md
