"""Artifact integrity: recorded checksums, ``load(verify="checksums")``, ``sparamx
check``, every load failure an ``ArtifactError`` naming the file and field, and a
seeded fuzz of a tiny artifact (truncations, byte flips in safetensors headers, tensor
data and metadata files, manifest edits): each mutation either fails to load with an
``ArtifactError`` or loads a model whose output is unchanged."""

import json
import random
import re
import shutil
import struct
import time

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer, zero_random_weights

import sparamx
from sparamx import cli
from sparamx.artifact import INDEX, MANIFEST, ArtifactError, read_manifest
from sparamx.integrity import ALGORITHM, manifest_digest

IDS = torch.tensor([[3, 17, 250, 99, 0, 42, 7]])


def tiny_packed(arch="llama", sparsity=0.5, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **cfg), dtype=torch.bfloat16)
    zero_random_weights(model, sparsity, skip=("lm_head",))
    sparamx.swap_linears(model, exclude=[])
    return model.eval()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny tied-embedding llama artifact in two shards (index file included)."""
    model = tiny_packed(tie_word_embeddings=True, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("pristine") / "art"
    sparamx.save(model, tiny_tokenizer(), path, max_shard_bytes=40_000)
    with torch.no_grad():
        ref = model(IDS).logits
    return path, ref


def clone(pristine, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(pristine[0], dst)
    return dst


def edit_manifest(path, edit):
    mf = path / MANIFEST
    manifest = json.loads(mf.read_text())
    edit(manifest)
    mf.write_text(json.dumps(manifest, indent=1))


def test_manifest_records_checksums(pristine):
    path, _ = pristine
    m = read_manifest(path, verify="checksums")
    sums = m["checksums"]
    assert sums["algorithm"] == ALGORITHM
    assert sums["manifest"] == manifest_digest(m)
    assert {"config.json", "generation_config.json", "tokenizer.json", INDEX} <= set(sums["files"])
    stored = set()
    for fname in m["files"]:
        from safetensors import safe_open

        with safe_open(str(path / fname), framework="pt") as f:
            stored |= set(f.keys())
    assert set(sums["tensors"]) == stored
    rec = sums["tensors"]["model.layers.0.self_attn.q_proj.values"]
    assert rec["dtype"] == "bfloat16" and len(rec["digest"]) == 16


def test_verify_checksums_round_trip(pristine):
    path, ref = pristine
    model, _ = sparamx.load(path, verify="checksums")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    with pytest.raises(ValueError, match="verify='everything'"):
        sparamx.load(path, verify="everything")


def test_flipped_tensor_byte_found_by_checksums_only(pristine, tmp_path):
    """A flipped bit in a norm weight keeps every cheap invariant: the default load
    accepts it, the checksum names the file and the tensor."""
    from safetensors import safe_open

    path = clone(pristine, tmp_path)
    fname, key = next(
        (f, k)
        for f in read_manifest(path)["files"]
        for k in safe_open(str(path / f), framework="pt").keys()
        if k.endswith("input_layernorm.weight")
    )
    data = bytearray((path / fname).read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8 : 8 + header_len])[key]["data_offsets"][0] + 8 + header_len
    data[start + 1] ^= 0x40
    (path / fname).write_bytes(bytes(data))
    sparamx.load(path)  # the invariants cannot see it
    with pytest.raises(ArtifactError, match=rf"{fname}: tensor {key}: checksum mismatch"):
        sparamx.load(path, verify="checksums")


def test_edited_manifest_and_config_found_by_checksums(pristine, tmp_path):
    path = clone(pristine, tmp_path)
    edit_manifest(path, lambda m: m["eval"].update(note="edited"))
    sparamx.load(path)
    with pytest.raises(ArtifactError, match="sparamx.json: checksum mismatch"):
        sparamx.load(path, verify="checksums")
    path = clone(pristine, tmp_path / "2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5  # loads, and changes every output
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"config.json: checksum mismatch"):
        sparamx.load(path, verify="checksums")


def test_header_dtype_edit_found_without_reading_data(pristine, tmp_path):
    """bf16 relabelled f16 has the same bytes: the recorded dtype catches it."""
    path = clone(pristine, tmp_path)
    fname = "model-00001-of-00002.safetensors"
    data = (path / fname).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + header_len]
    assert b'"BF16"' in header
    (path / fname).write_bytes(
        data[:8] + header.replace(b'"BF16"', b'"F16" ', 1) + data[8 + header_len :]
    )
    with pytest.raises(ArtifactError, match=rf"{fname}: tensor .*: float16 .* records bfloat16"):
        sparamx.load(path)


def test_old_artifact_without_checksums(pristine, tmp_path, capsys):
    path = clone(pristine, tmp_path)
    edit_manifest(path, lambda m: m.pop("checksums"))
    model, _ = sparamx.load(path)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, pristine[1])
    with pytest.raises(ArtifactError, match="no checksums recorded.*verify='invariants'"):
        sparamx.load(path, verify="checksums")
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"checksums\s+absent", out) and re.search(r"result\s+OK", out)


def test_check_command(pristine, tmp_path, capsys):
    path, _ = pristine
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"checksums\s+verified: \d+ tensors", out) and re.search(r"result\s+OK", out)
    assert cli.main(["check", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checksums"] == "verified" and summary["layers"] == 8
    broken = clone(pristine, tmp_path)
    (broken / "tokenizer.json").write_text("{}")
    assert cli.main(["check", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "tokenizer.json: checksum mismatch" in err
    assert cli.main(["check", str(tmp_path / "nothing")]) == 1
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and "sparamx check runs/" in out


# ------------------------------------------------- every failure an ArtifactError


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", -64, r"config.json: field hidden_size must be a positive integer"),
        ("num_hidden_layers", 0, r"config.json: field num_hidden_layers must be"),
        ("hidden_size", "wide", r"config.json: .*hidden_size"),
        ("num_attention_heads", 5, r"config.json"),
        ("model_type", "no-such-model", r"config.json: invalid config"),
        ("vocab_size", 300, r"does not match the model|expects"),
    ],
)
def test_bad_config_is_artifact_error(pristine, tmp_path, field, value, message):
    path = clone(pristine, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=message):
        sparamx.load(path)


@pytest.mark.parametrize("damage", ["missing", "garbled", "truncated"])
def test_bad_tokenizer_is_artifact_error(pristine, tmp_path, damage):
    path = clone(pristine, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = path / name
        if damage == "missing":
            f.unlink()
        elif damage == "garbled":
            f.write_bytes(b"\x00\xff" * 50)
        else:
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(ArtifactError, match="tokenizer"):
        sparamx.load(path)
    with pytest.raises(ArtifactError, match="tokenizer"):
        sparamx.load(path, verify="checksums")


@pytest.mark.parametrize("keep", [0, 5, 8, 40])
def test_truncated_safetensors_header_is_artifact_error(pristine, tmp_path, keep):
    """Cut inside the 8-byte length or the JSON header, with the manifest's size edited
    to match (so the size check does not catch it first)."""
    path = clone(pristine, tmp_path)
    f = path / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:keep])
    edit_manifest(path, lambda m: m["files"].update({f.name: keep}))
    with pytest.raises(ArtifactError, match=rf"{f.name}: unreadable safetensors"):
        sparamx.load(path)


# -------------------------------------------------------------------------- fuzz


def _header_span(data: bytes) -> int:
    if len(data) < 8:
        return len(data)
    return min(len(data), 8 + struct.unpack("<Q", data[:8])[0])


def _mutate_json_leaf(obj, rng):
    """Change one randomly chosen leaf (or drop one key) of a JSON object, in place."""
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node:
        key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
        path.append((node, key))
        node = node[key]
        if rng.random() < 0.25:
            break
    if not path:
        return
    parent, key = path[-1]
    value = parent[key]
    choice = rng.random()
    if isinstance(parent, dict) and choice < 0.2:
        del parent[key]
    elif isinstance(value, bool):
        parent[key] = not value
    elif isinstance(value, int):
        parent[key] = value + rng.choice([-1, 1, 16, -value - 1, 1 << 40])
    elif isinstance(value, str):
        parent[key] = value[:-1] + rng.choice("0af.x") if value else "x"
    else:
        parent[key] = rng.choice([None, [], {}, 0, "x", [1, 2]])


def _mutate(path, files: dict[str, bytes], rng) -> str:
    """Apply one random mutation to the artifact at ``path``; returns its description."""
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    others = sorted(f for f in files if f not in shards and f != MANIFEST)
    kind = rng.choice(
        ["truncate", "header", "header", "data", "data", "metadata", "manifest", "manifest"]
    )
    if kind == "manifest" and rng.random() < 0.7:
        manifest = json.loads(files[MANIFEST])
        _mutate_json_leaf(manifest, rng)
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return "manifest edit"
    name = {
        "truncate": rng.choice(sorted(files)),
        "header": rng.choice(shards),
        "data": rng.choice(shards),
        "metadata": rng.choice(others),
        "manifest": MANIFEST,
    }[kind]
    data = bytearray(files[name])
    if kind == "truncate":
        cut = rng.randrange(len(data))
        (path / name).write_bytes(bytes(data[:cut]))
        return f"truncate {name} at {cut}"
    span = _header_span(data)
    lo, hi = {"header": (0, span), "data": (span, len(data))}.get(kind, (0, len(data)))
    at = rng.randrange(lo, hi)
    data[at] ^= rng.randrange(1, 256)
    (path / name).write_bytes(bytes(data))
    return f"flip {name} byte {at}"


def test_fuzz_mutations_fail_cleanly_or_change_nothing(pristine, tmp_path):
    """300 seeded mutations of a tiny artifact: with verify="checksums" each gives an
    ArtifactError or the unchanged output; the default load gives an ArtifactError or a
    model (never another exception)."""
    src, ref = pristine
    files = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    work = tmp_path / "art"
    shutil.copytree(src, work)
    rng = random.Random(1234)
    outcomes = {"error": 0, "unchanged": 0}
    failures = []
    start = time.perf_counter()
    for trial in range(300):
        what = _mutate(work, files, rng)
        for verify in ("checksums", "invariants"):
            try:
                model, _ = sparamx.load(work, verify=verify)
            except ArtifactError:
                if verify == "checksums":
                    outcomes["error"] += 1
                continue
            except Exception as e:  # noqa: BLE001  (what the test is looking for)
                failures.append(f"{trial} {what} verify={verify}: {type(e).__name__}: {e}")
                continue
            if verify == "checksums":
                with torch.no_grad():
                    same = torch.equal(model(IDS).logits, ref)
                if not same:
                    failures.append(f"{trial} {what}: loaded with a changed output")
                outcomes["unchanged"] += same
        for name, data in files.items():  # restore what the mutation touched
            if (
                not (work / name).is_file()
                or (work / name).stat().st_size != len(data)
                or ((work / name).read_bytes() != data)
            ):
                (work / name).write_bytes(data)
    assert not failures, "\n".join(failures[:20])
    print(outcomes)
    assert outcomes["error"] > 200 and outcomes["unchanged"] > 0, outcomes
    assert time.perf_counter() - start < 120
