"""Checksums of a packed artifact: per tensor (its dtype, shape and raw bytes), per
metadata file (config, generation config, tokenizer files, shard index) and of the
manifest itself, all recorded in ``sparamx.json`` under ``checksums``.

The hash is xxHash's XXH3-64 (the ``xxhash`` wheel, a dependency of ``datasets``
already): ~7.6 GiB/s on one core of the development machine against ~0.9 GiB/s for
``zlib.crc32``, so verifying an 8B artifact costs about as much as reading it from disk
once. It detects accidental corruption (bit rot, truncated copies, editing mistakes);
it is not a cryptographic signature.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import xxhash

ALGORITHM = "xxh3_64"
_CHUNK = 16 << 20  # file hashing reads this many bytes at a time


def tensor_bytes(t: torch.Tensor):
    """A zero-copy uint8 numpy view of ``t``'s bytes (a contiguous copy if it is not
    contiguous): what safetensors writes for it on a little-endian machine."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def tensor_digest(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(tensor_bytes(t))


def tensor_record(t: torch.Tensor) -> dict:
    """The manifest entry of one stored tensor. dtype and shape are recorded beside the
    digest of the bytes because a header edit that turns bf16 into f16 (same bytes)
    would otherwise pass."""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "digest": tensor_digest(t),
    }


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest with ``checksums.manifest`` left out, over a canonical JSON
    form (sorted keys, no spaces), so re-indenting the file does not change it but
    editing any value does."""
    body = dict(manifest)
    sums = body.get("checksums")
    if isinstance(sums, dict):
        body["checksums"] = {k: v for k, v in sums.items() if k != "manifest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return xxhash.xxh3_64_hexdigest(text.encode())
