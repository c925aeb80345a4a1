"""``sparamx export``: a packed artifact back to a standard Hugging Face checkpoint
(``config.json``, generation config, tokenizer files, ``model.safetensors`` sharded
with an index past the shard size) that ``AutoModelForCausalLM.from_pretrained`` loads
with no sparamx installed.

Packed weights are densified: the pruned zeros are stored as zeros, so the checkpoint
is the size of the dense model. The way to fine-tune, resize the vocabulary or run a
packed model in another engine. A tied embedding that the artifact stores once in the
packed head's layout is written once too, as ``embed_tokens.weight`` with
``tie_word_embeddings: true`` (transformers' convention for tied weights).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .artifact import DEFAULT_SHARD_BYTES, ArtifactError, ShardWriter, _load, dedupe_tensors
from .layers import PackedEmbedding, SparseLinear

log = logging.getLogger(__name__)


def _dense_tensors(model: nn.Module, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in state_dict order with each packed module's tensors replaced by
    its dense ``weight`` (and ``bias``); unpacked one module at a time, so that a
    shard's worth of dense weights is in memory at once, not the whole model."""
    packed = {
        n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, PackedEmbedding))
    }
    done: set[str] = set()
    state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        owner = key.rpartition(".")[0]
        if owner not in packed:
            if key not in skip:
                yield key, t.detach()
            continue
        if owner in done:
            continue
        done.add(owner)
        mod = packed[owner]
        if f"{owner}.weight" not in skip:
            # PackedEmbedding.weight is the unscaled matrix, as nn.Embedding's would be.
            yield f"{owner}.weight", mod.weight.contiguous()
        if isinstance(mod, SparseLinear) and mod.bias is not None:
            yield f"{owner}.bias", mod.bias.detach()


def export(
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the artifact at ``artifact`` as a dense HF checkpoint directory ``out``
    (which must not exist or be empty). Raises ``ArtifactError`` for a broken artifact
    (checksums verified where it has them)."""
    artifact, out = Path(artifact), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} exists and is not an empty directory")
    model, tokenizer, _ = _load(artifact, {}, "checksums", require_checksums=False)
    manifest = model.sparamx_manifest
    config = model.config
    skip: set[str] = set()
    if manifest.get("packed_embeddings"):
        # sparamx untied the config when the embedding started reading the packed head;
        # the weights are one, so the checkpoint ties them again and stores the
        # embedding only, as save_pretrained would.
        config.tie_word_embeddings = True
        skip |= {f"{head}.weight" for head in manifest["packed_embeddings"].values()}
    # Tensors tied in the model (one Parameter under two names) go once; transformers
    # ties the alias back from the config on load. Found among the model's own tensors
    # only: densified ones are fresh, and a freed one's address can come back.
    packed = {n for n, m in model.named_modules() if isinstance(m, (SparseLinear, PackedEmbedding))}
    _, aliases = dedupe_tensors(
        (k, t) for k, t in model.state_dict().items() if k.rpartition(".")[0] not in packed
    )
    skip |= set(aliases)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    for name, t in _dense_tensors(model, skip):
        writer.add(name, t)
    files = writer.close()
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("exported %s to %s (%d safetensors files)", artifact, out, len(files))
    return out


def main(argv=None) -> int:
    """``python -m sparamx.export ARTIFACT OUT`` (also ``sparamx export``)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="sparamx export",
        description="Write a packed artifact as a standard Hugging Face checkpoint: pruned\n"
        "weights densified (zeros included), tied embeddings stored once, loadable by\n"
        "AutoModelForCausalLM.from_pretrained without sparamx. Checksums are verified\n"
        "first where the artifact has them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # the example comes from `sparamx export --help` (sparamx.cli)
    ap.add_argument("artifact", help="packed artifact directory (a run's pack/artifact)")
    ap.add_argument("out", help="directory to write (must not exist, or be empty)")
    ap.add_argument(
        "--max-shard-gb", type=float, default=2.0, help="shard size limit in GiB (default 2)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        path = export(args.artifact, args.out, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except (ArtifactError, FileExistsError) as e:
        print(f"sparamx export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
