"""Random-weight models at real shapes, written as a HF directory with safetensors shards:
the speed-work stand-in for checkpoints the hub would give us (no hub here).

    python -m sparamx.tools.random_model --preset llama3-8b --layers 32 --out /scratch/llama3-8b-32l

The ``llama3-8b`` preset is Meta-Llama-3-8B's architecture (hidden 4096, intermediate
14336, 32 heads / 8 KV heads, vocab 128256, untied head); ``--layers`` keeps fewer decoder
layers so a dense baseline and a packed copy fit in memory side by side. Weights are
written tensor by tensor through a shard writer, so writing the 16 GB model needs about
one shard of RAM. The tokenizer is SmolLM2's (offline, vocab 49152 < 128256: its ids are
valid inputs; ids it lacks decode to nothing).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PRESETS = {
    # meta-llama/Meta-Llama-3-8B config.json (the fields that set shapes and numerics).
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # The same architecture in miniature, for tests of the random-model code path.
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=49152,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
WEIGHT_STD = 0.02  # transformers' initializer_range for Llama: activations stay finite
DEFAULT_SHARD_BYTES = 2 << 30


def preset_config(preset: str, num_layers: int | None = None):
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown random-model preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        kw["num_hidden_layers"] = num_layers
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def write_random_model(
    dest: str | os.PathLike,
    preset: str = "llama3-8b",
    num_layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write a random model of ``preset`` to ``dest`` (a new directory; built under a temp
    name and renamed, so an interrupted write never looks like a model)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ..artifact import ShardWriter
    from ..models import load_model

    dest = Path(dest)
    if (dest / "config.json").exists():
        raise FileExistsError(f"{dest} already holds a model (config.json exists)")
    config = preset_config(preset, num_layers)
    # Names and shapes in the model's own order, without allocating anything.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.part-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is not
    try:
        gen = torch.Generator().manual_seed(seed)
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, shape in tqdm(shapes.items(), desc=f"random {preset}", disable=not progress):
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)  # RMSNorm scales start at 1
            else:
                t = torch.randn(shape, generator=gen).mul_(WEIGHT_STD).to(dtype)
            writer.add(name, t)
        writer.close()
        config.dtype = dtype
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
        ).save_pretrained(tmp)
        _, tok = load_model("smollm2-135m")
        tok.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)  # an empty or partial directory from an earlier attempt
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote random %s (%d layers) to %s", preset, config.num_hidden_layers, dest)
    return dest


def ensure_random_model(dest, preset: str, num_layers: int | None, seed: int) -> Path:
    """``dest`` if it already holds the requested random model, else write it there."""
    import json

    dest = Path(dest)
    cfg_path = dest / "config.json"
    if cfg_path.is_file():
        want = preset_config(preset, num_layers).num_hidden_layers
        have = json.loads(cfg_path.read_text()).get("num_hidden_layers")
        if have != want:
            raise ValueError(
                f"{dest} holds a {have}-layer model but the config asks for {want} layers "
                "(model.random.num_layers): choose another model.source directory"
            )
        return dest
    return write_random_model(dest, preset, num_layers, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a random-weight model at real shapes.")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="new directory to write")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    write_random_model(args.out, args.preset, args.layers, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
