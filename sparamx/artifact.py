"""Packed artifact: a directory with ``sparamx.json`` (manifest), the HF config,
generation config and tokenizer files, and safetensors (sharded past a size limit)
holding the dense tensors plus ``<name>.bitmap|values|offsets`` per packed layer (and
``<name>.scales`` for the int8 storages).

``save`` writes every file to a temp name and renames it, the manifest last, so a
directory without ``sparamx.json`` is never a half-written artifact mistaken for a
whole one. ``load`` memory-maps the safetensors and validates everything (format
version, tensor presence, shapes, dtypes, offsets against bitmap popcounts) before
any kernel sees it. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .format import (
    BF16_STORAGES,
    DENSE_STORAGES,
    FORMAT_VERSION,
    INT8_STORAGES,
    STORAGES,
    PackedWeight,
    PackedWeightError,
)
from .integrity import ALGORITHM, file_digest, manifest_digest, tensor_digest, tensor_record
from .layers import (
    PackedEmbedding,
    SparseLinear,
    guard_hf_methods,
    set_activation_dtype,
    untie_config,
)

log = logging.getLogger(__name__)

MANIFEST = "sparamx.json"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30
# Manifest versions this sparamx reads, and the storages each may name: version 2 added
# the int8 storages; a version-1 artifact (bf16 layers only) loads unchanged.
READ_VERSIONS = {1: BF16_STORAGES, 2: STORAGES}
assert FORMAT_VERSION in READ_VERSIONS


class ArtifactError(ValueError):
    """A packed artifact that is missing, foreign, corrupt or truncated."""


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def dedupe_tensors(
    items, seen: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors without aliases (tied weights): (tensors, {alias: stored name}). ``seen``
    carries the storage keys across calls when a caller dedupes in several passes."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen = {} if seen is None else seen
    for name, t in items:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, tied


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict without aliases (tied weights): (tensors, {alias: stored name})."""
    return dedupe_tensors(model.state_dict().items())


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes tensors, in the order given, into safetensors shards of at most
    ``max_bytes`` each (a tensor larger than that gets a shard of its own).

    A shard is written to a temp file as soon as the next tensor would overflow it, so a
    streaming caller holds at most one shard's tensors in memory. The final names
    (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index) need
    the shard count, so files are renamed in :meth:`close`. ``save`` uses the same writer:
    a streamed artifact and an in-memory one are split identically.
    """

    def __init__(self, path: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._cur: dict[str, torch.Tensor] = {}
        self._size = 0
        self._parts: list[tuple[Path, list[str]]] = []
        # {name: dtype, shape, digest} of every tensor added, for the manifest: hashed
        # here, from the tensor in memory, because this is the one place both save and
        # the streaming writer hand every stored tensor through.
        self.records: dict[str, dict] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.records[name] = tensor_record(tensor)
        nb = tensor.numel() * tensor.element_size()
        if self._cur and self._size + nb > self.max_bytes:
            self._flush()
        self._cur[name] = tensor
        self._size += nb

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.path / f".shard-{len(self._parts):05d}.part"
        save_file(self._cur, str(tmp), metadata={"format": "pt", "producer": "sparamx"})
        self._parts.append((tmp, list(self._cur)))
        self._cur, self._size = {}, 0

    def close(self) -> dict[str, int]:
        """Flush the last shard, give every shard its final name, write (or remove) the
        index; returns ``{file name: size in bytes}`` for the manifest."""
        self._flush()
        names = shard_file_names(len(self._parts))
        files = {}
        for fname, (tmp, _) in zip(names, self._parts, strict=True):
            os.replace(tmp, self.path / fname)
            files[fname] = (self.path / fname).stat().st_size
        if len(names) > 1:
            weight_map = {
                k: f for f, (_, keys) in zip(names, self._parts, strict=True) for k in keys
            }
            atomic_write_json(
                self.path / INDEX,
                {"metadata": {"total_size": sum(files.values())}, "weight_map": weight_map},
            )
        else:
            (self.path / INDEX).unlink(missing_ok=True)
        return files


def layer_record(name: str, mod: SparseLinear) -> dict:
    """The manifest entry of one packed linear."""
    p = mod.packed
    return {
        "name": name,
        "shape": list(p.shape),
        "nnz": p.nnz,
        "storage": p.storage,
        "bias": mod.bias is not None,
        "bytes": p.nbytes,
    }


def save(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    source: dict | None = None,
    recipe: dict | None = None,
    kv: dict | None = None,
    eval_summary: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a model whose linears are ``SparseLinear`` (see ``swap_linears``) as an artifact."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)  # invalid until the new manifest lands
    layers = [
        layer_record(name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, SparseLinear)
    ]
    if not layers:
        raise ValueError("save: the model has no SparseLinear layers (call swap_linears first)")
    head_of = {id(m.values): n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    packed_embeddings = {
        n: head_of[id(m.values)] for n, m in model.named_modules() if isinstance(m, PackedEmbedding)
    }
    tensors, tied = _unique_state(model)
    writer = ShardWriter(path, max_shard_bytes)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    dtype = next(
        (
            t.dtype
            for k, t in tensors.items()
            if t.is_floating_point() and not k.endswith((".values", ".scales"))
        ),
        torch.bfloat16,
    )
    write_metadata(
        path,
        model.config,
        getattr(model, "generation_config", None),
        tokenizer,
        layers=layers,
        tied=tied,
        packed_embeddings=packed_embeddings,
        files=files,
        dtype=dtype,
        tensor_records=writer.records,
        source=source,
        recipe=recipe,
        kv=kv,
        eval_summary=eval_summary,
    )
    return path


def write_metadata(
    path: Path,
    config,
    generation_config,
    tokenizer,
    *,
    layers: list[dict],
    tied: dict[str, str],
    packed_embeddings: dict[str, str],
    files: dict[str, int],
    dtype: torch.dtype,
    tensor_records: dict[str, dict],
    source: dict | None = None,
    recipe: dict | None = None,
    kv: dict | None = None,
    eval_summary: dict | None = None,
) -> None:
    """Write the HF config, generation config and tokenizer files, then the manifest
    (last: its presence marks a complete artifact) with the checksums of every tensor
    (``tensor_records``, from :class:`ShardWriter`), of those files and of itself.
    Shared by ``save`` and the streaming writer (:mod:`sparamx.pipeline.streaming`)."""
    config.save_pretrained(path)
    meta_files = ["config.json"]
    if generation_config is not None:
        generation_config.save_pretrained(path)
        meta_files.append("generation_config.json")
    if tokenizer is not None:
        written = tokenizer.save_pretrained(path)
        meta_files += [Path(f).name for f in written if (path / Path(f).name).is_file()]
    if len(files) > 1:
        meta_files.append(INDEX)
    manifest = {
        "format": "sparamx",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": source or {},
        "recipe": recipe or {},
        "dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
        "tied": tied,
        "packed_embeddings": packed_embeddings,
        "files": files,
        "kv": kv,
        "eval": eval_summary or {},
        "totals": {
            "packed_bytes": sum(lay["bytes"] for lay in layers),
            "dense_bytes": sum(2 * lay["shape"][0] * lay["shape"][1] for lay in layers),
        },
        "checksums": {
            "algorithm": ALGORITHM,
            "tensors": tensor_records,
            "files": {f: file_digest(path / f) for f in sorted(set(meta_files))},
        },
    }
    # The digest is of the manifest as it will read back (JSON turns tuples into lists).
    manifest = json.loads(json.dumps(manifest))
    manifest["checksums"]["manifest"] = manifest_digest(manifest)
    atomic_write_json(path / MANIFEST, manifest)
    log.info("saved artifact %s (%d packed layers, %d files)", path, len(layers), len(files))


VERIFY_MODES = ("invariants", "checksums")


def _check_verify(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES}")


def _is_str_map(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, str) for v in obj.values())


def _plain_name(name) -> bool:
    """A file name inside the artifact directory (no path separators, no '..')."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and ("\\" not in name)
    )


def read_manifest(path: str | os.PathLike, *, verify: str = "invariants") -> dict:
    """The parsed, structurally checked manifest of the artifact at ``path``.
    ``verify="checksums"`` also checks the manifest's own checksum (and requires one)."""
    _check_verify(verify)
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a directory (a sparamx artifact is a directory)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: not a sparamx artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "sparamx":
        raise ArtifactError(f"{mpath}: not a sparamx manifest (format field missing)")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise ArtifactError(
            f"{mpath}: format_version {version!r} is not supported "
            f"(this sparamx reads versions {', '.join(map(str, READ_VERSIONS))})"
        )
    # Checked before the other fields: an edited manifest is then reported as edited,
    # rather than by whatever the edit broke.
    sums = manifest.get("checksums")
    if sums is not None:
        ok = (
            isinstance(sums, dict)
            and sums.get("algorithm") == ALGORITHM
            and isinstance(sums.get("tensors"), dict)
            and all(isinstance(r, dict) for r in sums["tensors"].values())
            and _is_str_map(sums.get("files"))
            and all(_plain_name(f) for f in sums["files"])
            and isinstance(sums.get("manifest"), str)
        )
        if not ok:
            raise ArtifactError(
                f"{mpath}: field 'checksums' is malformed (this sparamx writes "
                f"{{algorithm: {ALGORITHM!r}, tensors, files, manifest}})"
            )
        if verify == "checksums" and manifest_digest(manifest) != sums["manifest"]:
            raise ArtifactError(
                f"{mpath}: checksum mismatch: the manifest was edited or corrupted after it "
                f"was written (field checksums.manifest)"
            )
    elif verify == "checksums":
        raise ArtifactError(
            f"{mpath}: no checksums recorded (written by sparamx "
            f"{manifest.get('package_version', '?')}, before artifacts carried them); "
            "load it with verify='invariants' (the default), or re-save it"
        )
    for key, kind in (("layers", list), ("files", dict), ("tied", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{mpath}: field {key!r} missing or not a {kind.__name__}")
    for fname, size in manifest["files"].items():
        if not _plain_name(fname) or not isinstance(size, int) or size < 0:
            raise ArtifactError(f"{mpath}: field 'files' is malformed at {fname!r}: {size!r}")
    for key in ("tied", "packed_embeddings"):
        value = manifest.get(key, {})
        if not (_is_str_map(value) and all(isinstance(k, str) for k in value)):
            raise ArtifactError(f"{mpath}: field {key!r} must map names to names: {value!r}")
    dtype = manifest.get("dtype", "bfloat16")
    if dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"{mpath}: field 'dtype' {dtype!r} is not one of {FLOAT_DTYPES}")
    if not (manifest.get("kv") is None or isinstance(manifest["kv"], dict)):
        raise ArtifactError(f"{mpath}: field 'kv' must be an object or null")
    for i, lay in enumerate(manifest["layers"]):
        ok = (
            isinstance(lay, dict)
            and isinstance(lay.get("name"), str)
            and isinstance(lay.get("shape"), list)
            and len(lay["shape"]) == 2
            and all(type(d) is int and d > 0 for d in lay["shape"])
            and lay.get("storage") in STORAGES
            and isinstance(lay.get("bias"), bool)
        )
        if not ok:
            raise ArtifactError(f"{mpath}: layers[{i}] is malformed: {lay!r}")
        if lay["storage"] not in READ_VERSIONS[version]:
            raise ArtifactError(
                f"{mpath}: layers[{i}] ({lay['name']}) has storage {lay['storage']!r}, which "
                f"format_version {version} does not have"
            )
    return manifest


FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def _verify_files(path: Path, manifest: dict) -> int:
    """Check the recorded checksums of the metadata files (config, tokenizer...);
    returns how many were checked."""
    for fname, digest in manifest["checksums"]["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise ArtifactError(f"{path}: missing file {fname} (listed in {MANIFEST} checksums)")
        if file_digest(fpath) != digest:
            raise ArtifactError(
                f"{fpath}: checksum mismatch (the file changed after the artifact was "
                f"written; field checksums.files.{fname})"
            )
    return len(manifest["checksums"]["files"])


def _check_record(fpath: Path, key: str, t: torch.Tensor, rec: dict | None, digest: bool):
    """Compare a stored tensor with its manifest record (dtype and shape always, the
    digest of its bytes with ``digest``)."""
    where = f"{fpath}: tensor {key}"
    if rec is None:
        raise ArtifactError(f"{where} is not recorded in {MANIFEST} (field checksums.tensors)")
    dtype = str(t.dtype).removeprefix("torch.")
    if rec.get("dtype") != dtype or rec.get("shape") != list(t.shape):
        raise ArtifactError(
            f"{where}: {dtype} {list(t.shape)}, the manifest records "
            f"{rec.get('dtype')} {rec.get('shape')} (header edited or file replaced)"
        )
    if digest and tensor_digest(t) != rec.get("digest"):
        raise ArtifactError(
            f"{where}: checksum mismatch (its bytes changed after the artifact was written)"
        )


def _open_tensors(path: Path, manifest: dict, verify: str) -> dict[str, torch.Tensor]:
    """Memory-map every shard and return {name: tensor}; checks sizes first, then each
    tensor against its manifest record where the artifact has them."""
    from safetensors.torch import safe_open

    records = (manifest.get("checksums") or {}).get("tensors")
    out: dict[str, torch.Tensor] = {}
    for fname, size in manifest["files"].items():
        fpath = path / fname
        if not fpath.is_file():
            raise ArtifactError(f"{path}: missing file {fname} (listed in {MANIFEST})")
        actual = fpath.stat().st_size
        if actual != size:
            raise ArtifactError(
                f"{fpath}: size {actual} bytes, manifest says {size} (truncated or replaced)"
            )
        try:
            with safe_open(str(fpath), framework="pt") as f:
                got = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:  # noqa: BLE001  (SafetensorError, OSError, ...: all unreadable)
            raise ArtifactError(f"{fpath}: unreadable safetensors file ({e})") from None
        for key, t in got.items():
            if key in out:
                raise ArtifactError(f"{fpath}: tensor {key} is also stored in another file")
            if records is not None:
                _check_record(fpath, key, t, records.get(key), verify == "checksums")
            out[key] = t
    if records is not None and (absent := sorted(set(records) - set(out))):
        raise ArtifactError(
            f"{path}: tensors recorded in {MANIFEST} are in no safetensors file: {absent[:5]}"
        )
    return out


def _packed_layer(lay: dict, tensors: dict[str, torch.Tensor]) -> SparseLinear:
    name = lay["name"]
    storage = lay["storage"]
    keys = ["values"] if storage in DENSE_STORAGES else ["bitmap", "values", "offsets"]
    if storage in INT8_STORAGES:
        keys.append("scales")
    if lay["bias"]:
        keys.append("bias")
    got = {}
    for k in keys:
        t = tensors.pop(f"{name}.{k}", None)
        if t is None:
            raise ArtifactError(f"packed layer {name}: tensor {name}.{k} missing")
        got[k] = t
    bias = got.get("bias")
    if bias is not None and (
        bias.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or tuple(bias.shape) != (lay["shape"][0],)
    ):
        raise ArtifactError(
            f"packed layer {name}: bias must be a float [{lay['shape'][0]}] tensor, got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )
    try:
        packed = PackedWeight(
            tuple(lay["shape"]),
            lay["storage"],
            got["values"],
            got.get("bitmap"),
            got.get("offsets"),
            got.get("scales"),
        )
    except PackedWeightError as e:
        raise ArtifactError(f"packed layer {name}: {e}") from None
    if "nnz" in lay and packed.nnz != lay["nnz"] and storage not in DENSE_STORAGES:
        raise ArtifactError(f"packed layer {name}: nnz {packed.nnz} != manifest {lay['nnz']}")
    return SparseLinear(packed, bias)


def _replace(model: nn.Module, name: str, make, kind: type, shape: list[int], config) -> None:
    """Put ``make(old)`` at ``name`` after checking the model has a ``kind`` there of ``shape``."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(
            f"packed layer {name} does not exist in the {config.model_type} model of config.json"
        ) from None
    old_shape = (
        [old.out_features, old.in_features]
        if isinstance(old, nn.Linear)
        else list(old.weight.shape)
        if isinstance(old, nn.Embedding)
        else None
    )
    if not isinstance(old, kind) or old_shape != list(shape):
        raise ArtifactError(f"packed layer {name}: shape {shape} does not match the model ({old})")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, make(old))


@contextmanager
def _as_artifact_error(what: str):
    """Re-raise any failure inside as an ArtifactError that starts with ``what`` (the
    file or field at fault). transformers and tokenizers raise many types for a bad
    config or tokenizer file (ValueError, KeyError, OSError, huggingface_hub's
    StrictDataclassFieldValidationError, tokenizers' Exception): the caller sees one."""
    try:
        yield
    except ArtifactError:
        raise
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise  # not the artifact's fault
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{what}: {type(e).__name__}: {e}") from e


def load(
    path: str | os.PathLike,
    *,
    kv: dict | None = None,
    verify: str = "invariants",
    dtype: str | torch.dtype | None = None,
):
    """Load a packed artifact: returns ``(model, tokenizer)``; ``model.generate`` works.

    ``verify``: ``"invariants"`` (default) checks what costs no pass over the data:
    format version, file sizes, tensor presence, dtypes and shapes, offsets against the
    bitmap popcounts. ``"checksums"`` also checks the recorded checksum of every tensor,
    metadata file and of the manifest (one read of the whole artifact; fails on an
    artifact written before checksums existed). Every problem is an ``ArtifactError``.

    ``kv`` overrides the manifest's sparse-KV-cache settings (``{}``: none); with
    ``method`` other than ``none`` the model gets the sparse KV cache
    (``sparamx.kv.enable_sparse_kv``), which ``model.generate`` then uses. ``dtype``:
    what the model's other parts (norms, embeddings, activations, attention) run in;
    None keeps the stored dtype (the manifest's, bf16 by default). The packed weights
    stay bf16 whatever it is (``sparamx.layers.set_activation_dtype``)."""
    model, tokenizer, _ = _load(Path(path), kv, verify)
    if dtype is not None:
        from .models import parse_dtype

        set_activation_dtype(model, parse_dtype(dtype))
    return model, tokenizer


def _load(path: Path, kv: dict | None, verify: str, require_checksums: bool = True):
    """``load``, plus a summary of what was verified (for ``sparamx check``). Without
    ``require_checksums`` an artifact that has none is verified as far as it can be."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    _check_verify(verify)
    manifest = read_manifest(path)
    if verify == "checksums" and (require_checksums or "checksums" in manifest):
        manifest = read_manifest(path, verify="checksums")
    has_sums = "checksums" in manifest
    digests = verify == "checksums" and has_sums
    checked_files = _verify_files(path, manifest) if digests else 0
    kv = manifest.get("kv") if kv is None else kv
    kv_settings = None
    if kv and kv.get("method", "none") != "none":
        from .kv import KVSettings

        with _as_artifact_error(f"{path / MANIFEST}: invalid KV cache settings (field kv)"):
            try:
                kv_settings = KVSettings.from_dict(kv)
            except ValueError as e:
                raise ArtifactError(f"{path}: invalid KV cache settings: {e}") from None
    tensors = _open_tensors(path, manifest, "checksums" if digests else "invariants")
    summary = {
        "files": dict(manifest["files"]),
        "tensors": len(tensors),
        "bytes": sum(manifest["files"].values()),
        "checksums": "verified" if digests else "present" if has_sums else "absent",
        "checked_files": checked_files,
    }
    with _as_artifact_error(f"{path / 'config.json'}: invalid config"):
        config = AutoConfig.from_pretrained(path)
    _check_config_dims(path / "config.json", config)
    dtype = getattr(torch, manifest.get("dtype", "bfloat16"))
    # Built on the CPU without initialising weights: parameters are allocated but never
    # touched (no RSS), and non-persistent buffers such as rotary frequencies are
    # computed as transformers computes them. A config whose dimensions make no model
    # (heads that do not divide the width...) fails here.
    with _as_artifact_error(f"{path / 'config.json'}: no model can be built from it"):
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with _as_artifact_error(f"{path}: the tensors do not fit the model of config.json"):
        _assemble(path, model, config, manifest, tensors)
    model.eval()
    _load_generation_config(path, model)
    with _as_artifact_error(f"{path}: unreadable tokenizer files"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.sparamx_manifest = manifest
    if kv_settings is not None:
        from .kv import enable_sparse_kv

        enable_sparse_kv(model, kv_settings)
    return model, tokenizer, summary


def _load_generation_config(path: Path, model) -> None:
    """The artifact's ``generation_config.json`` (saved from the source model) as the
    model's: ``from_config`` builds one from config.json alone, which would drop the
    source's sampling defaults (``sparamx.generate`` reads them)."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        with _as_artifact_error(f"{path / 'generation_config.json'}: invalid generation config"):
            model.generation_config = GenerationConfig.from_pretrained(path)


# Model dimensions every decoder config has (when present): torch would fail on a bad
# one deep inside the model's constructor, with a message that names no field.
CONFIG_DIMS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


def _check_config_dims(cpath: Path, config) -> None:
    for field in CONFIG_DIMS:
        value = getattr(config, field, None)
        if value is not None and (type(value) is not int or value < 1):
            raise ArtifactError(f"{cpath}: field {field} must be a positive integer, got {value!r}")


def _assemble(path: Path, model: nn.Module, config, manifest: dict, tensors: dict) -> None:
    """Put the packed layers and the stored tensors into ``model`` (built from the
    config), checking that every tensor has its place and every place its tensor."""
    # Tied tensors are stored once; give every alias its tensor (the same object, so
    # the tie survives load_state_dict(assign=True)).
    for alias, target in manifest["tied"].items():
        if target not in tensors:
            raise ArtifactError(
                f"{path}: tied tensor {alias} points to {target}, which is not in the safetensors"
            )
        tensors[alias] = tensors[target]
    for lay in manifest["layers"]:
        _replace(
            model,
            lay["name"],
            lambda old, lay=lay: _packed_layer(lay, tensors),
            nn.Linear,
            lay["shape"],
            config,
        )
    for emb_name, head_name in manifest.get("packed_embeddings", {}).items():
        try:
            head = model.get_submodule(head_name)
        except AttributeError:
            head = None
        if not isinstance(head, SparseLinear):
            raise ArtifactError(f"packed embedding {emb_name}: {head_name} is not packed")
        tensors.pop(f"{emb_name}.values", None)
        _replace(
            model,
            emb_name,
            lambda old, head=head: PackedEmbedding.like(old, head),
            nn.Embedding,
            [head.out_features, head.in_features],
            config,
        )
        untie_config(model)
    expected = model.state_dict()
    packed_names = [lay["name"] for lay in manifest["layers"]]
    packed_names += list(manifest.get("packed_embeddings", {}))
    packed_keys = {k for k in expected if any(k.startswith(n + ".") for n in packed_names)}
    missing = sorted(set(expected) - packed_keys - set(tensors))
    if missing:
        raise ArtifactError(
            f"{path}: tensors missing from the safetensors: {missing[:5]}"
            + (" ..." if len(missing) > 5 else "")
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ArtifactError(f"{path}: unexpected tensors in the safetensors: {extra[:5]}")
    for key, t in tensors.items():
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape):
            raise ArtifactError(
                f"{path}: tensor {key} has shape {tuple(t.shape)}, the model "
                f"expects {tuple(want.shape)}"
            )
        # Exact dtypes may differ (a module kept in fp32), the kind may not: an int
        # tensor where a norm weight belongs would only fail inside the forward.
        if t.is_floating_point() != want.is_floating_point():
            raise ArtifactError(
                f"{path}: tensor {key} is {t.dtype}, the model expects {want.dtype}"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    # assign=True wraps each key in its own Parameter; re-tie to one object, as
    # transformers' tie_weights would.
    for alias, target in manifest["tied"].items():
        owner, _, attr = alias.rpartition(".")
        src_owner, _, src_attr = target.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(src_owner), src_attr))
    guard_hf_methods(model)


def copy_artifact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy an artifact directory (manifest last)."""
    src, dst = Path(src), Path(dst)
    read_manifest(src)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != MANIFEST and f.is_file():
            shutil.copy2(f, dst / f.name)
    shutil.copy2(src / MANIFEST, dst / MANIFEST)


def check(path: str | os.PathLike) -> dict:
    """Validate everything about the artifact at ``path`` that can be validated (what
    ``sparamx check`` runs): manifest structure and checksum, every metadata file's and
    every tensor's checksum (when the artifact has them; an older one gets the
    invariants only), the packed-format invariants, the config and tokenizer, then a
    greedy step of generation whose logits must be finite. Raises ``ArtifactError``;
    returns a summary."""
    import time

    start = time.perf_counter()
    path = Path(path)
    model, tokenizer, summary = _load(path, None, "checksums", require_checksums=False)
    manifest = model.sparamx_manifest
    storages = [lay["storage"] for lay in manifest["layers"]]
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([[first]]),
            max_new_tokens=2,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    bad = [i for i, lg in enumerate(out.logits) if not torch.isfinite(lg).all()]
    if bad:
        raise ArtifactError(
            f"{path}: the model loads but its logits are not finite (generation step {bad[0]}); "
            "the stored values hold NaN or inf"
        )
    return {
        **summary,
        "path": str(path),
        "format_version": manifest["format_version"],
        "package_version": manifest.get("package_version"),
        "model_type": model.config.model_type,
        "layers": len(storages),
        "bitmap_layers": sum(s.startswith("bitmap-") for s in storages),
        "dense_layers": sum(s.startswith("dense-") for s in storages),
        "int8_layers": sum(s in INT8_STORAGES for s in storages),
        "packed_bytes": (manifest.get("totals") or {}).get("packed_bytes"),
        "dense_bytes": (manifest.get("totals") or {}).get("dense_bytes"),
        "kv": (manifest.get("kv") or {}).get("method", "none"),
        "seconds": time.perf_counter() - start,
    }
