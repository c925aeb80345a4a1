"""Artifact round trip (save -> load -> same logits, generate works) and clear errors
for foreign, corrupt, truncated or tampered artifacts."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config, zero_random_weights

import sparamx
from sparamx.artifact import ArtifactError, read_manifest


@pytest.fixture(scope="module")
def tokenizer():
    from sparamx.models import load_model

    return load_model("smollm2-135m")[1]


def packed_tiny(arch="llama", sparsity=0.5, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **cfg), dtype=torch.bfloat16)
    zero_random_weights(model, sparsity)
    sparamx.swap_linears(model)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    model = packed_tiny()
    path = tmp_path_factory.mktemp("art") / "tiny"
    sparamx.save(model, tokenizer, path, recipe={"method": "magnitude", "sparsity": 0.5})
    return model, path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_round_trip_same_logits_and_generate(tmp_path, tokenizer, arch):
    model = packed_tiny(arch)
    sparamx.save(model, tokenizer, tmp_path / "a")
    loaded, tok = sparamx.load(tmp_path / "a")
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    ref = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert tok.vocab_size == tokenizer.vocab_size


def test_tied_embeddings_stay_shared(tmp_path, tokenizer):
    model = packed_tiny("gemma")  # gemma ties lm_head to the embeddings
    sparamx.save(model, tokenizer, tmp_path / "g")
    manifest = read_manifest(tmp_path / "g")
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = sparamx.load(tmp_path / "g")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_manifest_records_layers_and_recipe(saved):
    _, path = saved
    m = read_manifest(path)
    assert m["format_version"] == sparamx.FORMAT_VERSION
    assert m["recipe"]["method"] == "magnitude"
    assert len(m["layers"]) == 14
    lay = m["layers"][0]
    assert set(lay) >= {"name", "shape", "nnz", "storage", "bias"}


def test_sharded_save_loads(tmp_path, tokenizer):
    model = packed_tiny()
    sparamx.save(model, tokenizer, tmp_path / "s", max_shard_bytes=20_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 2
    loaded, _ = sparamx.load(tmp_path / "s")
    ids = torch.randint(0, 257, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def test_foreign_and_missing_directories(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        sparamx.load(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a sparamx artifact"):
        sparamx.load(tmp_path / "hf")


def test_truncated_safetensors(saved, tmp_path):
    path = copy(saved, tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        sparamx.load(path)


def test_corrupt_safetensors_header(saved, tmp_path):
    path = copy(saved, tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        sparamx.load(path)


def test_missing_file(saved, tmp_path):
    path = copy(saved, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing file model.safetensors"):
        sparamx.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.pop("layers"), "field 'layers' missing"),
        (lambda m: m["layers"][0].update(shape=[64, -1]), r"layers\[0\] is malformed"),
        (lambda m: m["layers"][0].update(shape=[48, 64]), "does not match the model"),
        (lambda m: m["layers"][0].update(name="model.nothing"), "does not exist"),
        (lambda m: m["layers"][0].update(storage="dense-bf16"), "dense values hold"),
    ],
)
def test_edited_manifest(saved, tmp_path, edit, message):
    path = copy(saved, tmp_path)
    mf = path / "sparamx.json"
    manifest = json.loads(mf.read_text())
    edit(manifest)
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        sparamx.load(path)


def test_corrupt_manifest_json(saved, tmp_path):
    path = copy(saved, tmp_path)
    (path / "sparamx.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        sparamx.load(path)


def test_tampered_offsets(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy(saved, tmp_path)
    f = path / "model.safetensors"
    tensors = load_file(f)
    name = next(k for k in tensors if k.endswith(".offsets"))
    tensors[name] = tensors[name].clone()
    tensors[name][1] += 1
    save_file(tensors, f)
    manifest = json.loads((path / "sparamx.json").read_text())
    manifest["files"]["model.safetensors"] = f.stat().st_size
    (path / "sparamx.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="offsets inconsistent with bitmap popcounts"):
        sparamx.load(path)


def test_save_without_sparse_layers_is_refused(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="no SparseLinear"):
        sparamx.save(model, tokenizer, tmp_path / "x")


def test_packed_embedding_round_trip(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from sparamx.layers import PackedEmbedding

    torch.manual_seed(0)
    cfg = tiny_config("llama", tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    sparamx.swap_linears(model, exclude=[])
    sparamx.save(model, tokenizer, tmp_path / "t")
    manifest = read_manifest(tmp_path / "t")
    assert manifest["packed_embeddings"] == {"model.embed_tokens": "lm_head"}
    loaded, _ = sparamx.load(tmp_path / "t")
    loaded.tie_weights()  # lm-eval's HFLM calls it: must not look for embed_tokens.weight
    emb = loaded.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.values is loaded.lm_head.values
    ids = torch.randint(0, 257, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
