"""Streaming prune + pack from safetensors shards: the artifact equals the in-memory path's
(same tensors, shards, manifest), loads with ``sparamx.load``, and bad checkpoints fail
with errors that name the file or tensor."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import pruning
import sparamx
from sparamx.artifact import INDEX, MANIFEST
from sparamx.layers import swap_linears
from sparamx.pipeline.streaming import CheckpointError, SafetensorsCheckpoint, stream_prune_pack


@pytest.fixture(scope="module")
def tokenizer():
    from sparamx.models import load_model

    return load_model("smollm2-135m")[1]


def write_model(path, tokenizer, tie=False, shard="60KB"):
    """A tiny random Llama saved as several safetensors shards (fp32 on disk, as many hub
    checkpoints are, so the bf16 cast on load is exercised too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        tie_word_embeddings=tie,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer.save_pretrained(path)
    return path


def in_memory_artifact(src, out, method, calib, shard_bytes, allocation="uniform", storage="auto"):
    model, tok = sparamx.models.load_model(str(src), dtype="bfloat16")
    pruning.prune(
        model,
        method,
        0.5,
        calibration=calib,
        batch_size=2,
        progress=False,
        allocation=allocation,
    )
    swap_linears(model, exclude=[], storage=storage)
    sparamx.save(model, tok, out, max_shard_bytes=shard_bytes)
    return out


def assert_same_artifact(a, b):
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    assert ma == mb  # the checksums included: the same tensors, hashed alike
    assert set(ma["checksums"]["tensors"]) == {k for f in ma["files"] for k in load_file(a / f)}
    assert len(ma["files"]) > 1  # sharded: the index path is exercised
    assert json.loads((a / INDEX).read_text()) == json.loads((b / INDEX).read_text())
    for fname in ma["files"]:
        ta, tb = load_file(a / fname), load_file(b / fname)
        assert list(ta) == list(tb)
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb


@pytest.mark.parametrize(
    "method, tie, allocation",
    [
        ("magnitude", False, "uniform"),
        ("wanda", False, "uniform"),
        ("magnitude", True, "uniform"),
        ("sparsegpt", False, "uniform"),
        ("sparsegpt", False, "owl"),
        ("magnitude", False, "owl"),
    ],
)
def test_streamed_artifact_equals_in_memory(tmp_path, tokenizer, method, tie, allocation):
    src = write_model(tmp_path / "src", tokenizer, tie=tie)
    assert len(SafetensorsCheckpoint(src).weight_map) > 0
    assert (src / INDEX).is_file()  # the source is sharded
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    calib = calib if method != "magnitude" or allocation == "owl" else None
    shard_bytes = 40_000
    ref = in_memory_artifact(src, tmp_path / "mem", method, calib, shard_bytes, allocation)
    res = stream_prune_pack(
        src,
        tmp_path / "stream",
        method=method,
        sparsity=0.5,
        allocation=allocation,
        calibration_ids=calib,
        batch_size=2,
        exclude=[],
        max_shard_bytes=shard_bytes,
        progress=False,
    )
    assert_same_artifact(ref, res.path)
    targets = {r["layer"]: r["target"] for r in res.allocation.get("layers", [])}
    assert len(res.stats) == 3 * 7
    # floor(s * 64) zeros per row: within 1/64 of the layer target
    assert all(abs(s["sparsity"] - targets.get(s["layer"], 0.5)) <= 1 / 64 for s in res.stats)
    if method == "sparsegpt":  # the layer's fp64 Hessians: 6 of 64 x 64, one 128 x 128
        assert res.timings["statistics_peak_mb"] == (6 * 64 * 64 + 128 * 128) * 8 / 2**20
    model, tok = sparamx.load(res.path, verify="checksums")
    ids = tok("The history of the printing press", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


@pytest.mark.parametrize(
    "storage, tie", [("bitmap-int8", False), ("dense-int8", False), ("auto-int8", True)]
)
def test_streamed_int8_artifact_equals_in_memory(tmp_path, tokenizer, storage, tie):
    # int8 layers carry fp32 scales: the streaming writer must keep them fp32, as the
    # in-memory save does, instead of casting every float tensor to the work dtype. A
    # tied head packed as int8 (auto-int8: dense-int8, unpruned) keeps the embedding
    # bf16 beside it, streamed or not.
    from sparamx.pipeline.verify import verify_against_checkpoint

    src = write_model(tmp_path / "src", tokenizer, tie=tie)
    ref = in_memory_artifact(src, tmp_path / "mem", "magnitude", None, 40_000, storage=storage)
    res = stream_prune_pack(
        src,
        tmp_path / "stream",
        method="magnitude",
        sparsity=0.5,
        exclude=[],
        storage=storage,
        max_shard_bytes=40_000,
        progress=False,
    )
    assert_same_artifact(ref, res.path)
    model, _ = sparamx.load(res.path, verify="checksums")
    assert sum(type(m).__name__ in ("SparseLinear", "DenseLinear") for m in model.modules()) > 0
    if storage == "auto-int8":
        assert {lay["storage"] for lay in res.layers} == {"bitmap-int8", "dense-int8"}
        assert model.lm_head.storage == "dense-int8"
        assert type(model.model.embed_tokens) is torch.nn.Embedding
    # the streaming run's verify: kept int8 values within half a step of the source's
    rep = verify_against_checkpoint(res.path, src)
    assert rep["weights_match"] and rep["worst_layer_rel_l2"] < 1e-2
    assert len(rep["layers"]) == 3 * 7 + 1


def test_missing_shard_file_is_named(tmp_path, tokenizer):
    src = write_model(tmp_path / "src", tokenizer)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        stream_prune_pack(src, tmp_path / "a", method="magnitude", sparsity=0.5, progress=False)


def test_missing_tensor_is_named(tmp_path, tokenizer):
    src = write_model(tmp_path / "src", tokenizer)
    index = json.loads((src / INDEX).read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (src / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        stream_prune_pack(src, tmp_path / "a", method="magnitude", sparsity=0.5, progress=False)


def test_index_pointing_at_wrong_file_is_named(tmp_path, tokenizer):
    src = write_model(tmp_path / "src", tokenizer)
    index = json.loads((src / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (src / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        SafetensorsCheckpoint(src)


def test_no_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_fast_mask_selection_equals_stable_sort(granularity):
    """The float32 selection path of mask_from_scores (used at 8B scale for speed) drops
    exactly what a stable sort drops: ties by lower index, negatives, -0.0 == +0.0."""
    from pruning.scores import mask_from_scores, prune_count

    g = torch.Generator().manual_seed(0)
    s = torch.randint(-4, 5, (37, 64), generator=g).float() / 2  # many ties, negatives
    s[0, :8] = -0.0
    s[1, :8] = 0.0
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        fast = mask_from_scores(s, sparsity, granularity)
        groups = s if granularity == "row" else s.reshape(1, -1)
        k = prune_count(sparsity, groups.shape[1])
        ref = torch.ones_like(groups, dtype=torch.bool)
        ref.scatter_(1, torch.sort(groups, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(fast, ref.reshape(s.shape)), sparsity


def pipeline_config(tmp_path, storage="auto", **model):
    import yaml

    cfg = {
        "name": "stream",
        "output_dir": str(tmp_path / "runs"),
        "model": model,
        "prune": {"method": "magnitude", "sparsity": 0.5},
        "eval": {"tasks": []},
        "pack": {"exclude": [], "max_shard_gb": 0.0002, "storage": storage},
        "bench": {"enabled": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("storage", ["auto", "auto-int8"])
def test_pipeline_streams_a_random_model(tmp_path, storage):
    """configs/llama8b-random.yaml's path in miniature: the load stage writes a random
    model, prune + pack stream it into a sharded artifact, verify checks it against the
    source checkpoint; a rerun skips every stage."""
    from sparamx.pipeline import runner as pipeline

    src = tmp_path / "models" / "tiny"
    cfg = pipeline_config(
        tmp_path,
        storage,
        source=str(src),
        streaming=True,
        random={"preset": "tiny-llama", "num_layers": 3},
    )
    assert pipeline.main([str(cfg)]) == 0
    run = tmp_path / "runs" / "stream"
    assert json.loads((src / "config.json").read_text())["num_hidden_layers"] == 3
    assert (src / "model.safetensors").is_file()  # one file: the unsharded source path
    source = json.loads((run / "load" / "source.json").read_text())
    assert source["streaming"] is True and source["architecture"] == "LlamaForCausalLM"
    verify = json.loads((run / "verify" / "verify.json").read_text())
    assert verify["passed"] and len(verify["layers"]) == 3 * 7 + 1
    layers = json.loads((run / "pack" / "layers.json").read_text())
    assert len(layers["layers"]) == 21 and layers["streaming"]["peak_rss_mb"] > 0
    art = run / "pack" / "artifact"
    assert len(json.loads((art / MANIFEST).read_text())["files"]) > 1
    assert (run / "report" / "report.md").is_file()
    model, tok = sparamx.load(art)
    assert model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=2).shape[1] > 1
    state = json.loads((run / "state.json").read_text())
    kind = "int8" if storage == "auto-int8" else "bf16"
    assert f"as {storage} (21 bitmap-{kind}, 1 dense-{kind})" in state["stages"]["pack"]["summary"]
    assert pipeline.main([str(cfg)]) == 0
    assert json.loads((run / "state.json").read_text()) == state  # nothing re-ran


def test_streaming_auto_keeps_small_models_in_memory(tmp_path, tokenizer):
    from sparamx.pipeline.config import load_config
    from sparamx.pipeline.runner import Pipeline

    src = write_model(tmp_path / "src", tokenizer)
    cfg = load_config(pipeline_config(tmp_path, source=str(src)))
    assert cfg.model.streaming == "auto"
    assert Pipeline(cfg).streaming is False
    cfg = load_config(pipeline_config(tmp_path, source=str(src), streaming=True))
    assert cfg.model.streaming == "true" and Pipeline(cfg).streaming is True


def test_random_model_dir_with_other_layer_count_is_refused(tmp_path):
    from sparamx.tools.random_model import ensure_random_model

    dest = ensure_random_model(tmp_path / "m", "tiny-llama", 1, 0)
    assert ensure_random_model(dest, "tiny-llama", 1, 0) == dest  # reused
    with pytest.raises(ValueError, match="1-layer model but the config asks for 2"):
        ensure_random_model(dest, "tiny-llama", 2, 0)


def test_weight_bytes_per_token_counts_linears_once(tiny_llama):
    """The bench's bandwidth figure: dense linears count their bf16 weights, packed ones
    their bitmap + values + offsets; embeddings are not counted."""
    from sparamx.pipeline.bench import weight_bytes_per_token

    model = tiny_llama.to(torch.bfloat16)
    dense = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes_per_token(model) == dense
    pruning.prune(model, "magnitude", 0.5, progress=False)
    swap_linears(model)  # lm_head stays an nn.Linear
    packed = sum(m.packed.nbytes for m in model.modules() if isinstance(m, sparamx.SparseLinear))
    head = model.lm_head.weight.numel() * 2
    assert weight_bytes_per_token(model) == packed + head < dense
