"""Prune and pack a causal LM one decoder layer at a time, straight from its safetensors
shards into a sharded sparamx artifact: the path for models larger than RAM (Llama-3-8B
in bf16 is 16 GB; the machine this targets has 24 GiB).

    from sparamx.pipeline.streaming import stream_prune_pack
    result = stream_prune_pack("path/to/hf_dir", "artifact_dir", method="magnitude", sparsity=0.5)

The model skeleton is built without initialising its weights (allocated, never touched, so
it costs address space but no RSS). The tensors outside the decoder layers (embeddings,
final norm, head) are loaded once; then, per decoder layer: its tensors are copied out of
the memory-mapped shards, the layer is pruned with :func:`pruning.prune_decoder_layer`
(calibration states carried forward from the pruned layer before), its linears are
packed, the packed tensors go to a :class:`~sparamx.artifact.ShardWriter`, and the layer
moves to the meta device (freed). Peak RSS is about: outer tensors + one layer and its
fp32 scores (SparseGPT: and its Hessians, ``timings["statistics_peak_mb"]``) + one
artifact shard + the calibration states. An OWL allocation first reads every layer once
more, dense, to measure its outlier ratio.

The artifact is the one ``sparamx.save`` writes for the same model and recipe (same
tensors, same order, same shards, same manifest), and ``sparamx.load`` memory-maps it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifact import (
    DEFAULT_SHARD_BYTES,
    INDEX,
    MANIFEST,
    ShardWriter,
    dedupe_tensors,
    layer_record,
    write_metadata,
)
from ..layers import PackedEmbedding, SparseLinear, linear_names, share_tied_embedding
from ..models import parse_dtype

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A model directory whose safetensors files are missing, incomplete or unreadable."""


class SafetensorsCheckpoint:
    """The tensors of a HF model directory (``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``), read a few at a time.

    Shards are opened per :meth:`read` call and closed after copying: a tensor from
    ``safe_open`` is a view of the memory-mapped file, and every page touched through a
    mapping that stays open counts in RSS, so keeping the files open while streaming
    would end with the whole model resident.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        elif (self.path / SINGLE_FILE).is_file():
            self.weight_map = {}
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX} (streaming needs safetensors "
                "weights; convert .bin checkpoints with save_pretrained first)"
            )
        files = sorted(set(self.weight_map.values())) or [SINGLE_FILE]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{self.path}: shard file(s) {missing} listed in {INDEX} are missing"
            )
        # Read every header once (cheap: safetensors headers are small JSON) so a tensor
        # the index promises but its file lacks is reported before any work starts.
        self.shapes: dict[str, tuple[int, ...]] = {}
        held: dict[str, str] = {}
        for fname in files:
            try:
                with safe_open(str(self.path / fname), framework="pt") as f:
                    for key in f.keys():
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
                        held[key] = fname
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{self.path / fname}: unreadable safetensors ({e})"
                ) from None
        if not self.weight_map:
            self.weight_map = held
        for key, fname in self.weight_map.items():
            if held.get(key) != fname:
                raise CheckpointError(
                    f"{self.path}: {INDEX} puts tensor {key} in {fname}, but that file "
                    f"does not hold it"
                )

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())

    def require(self, names: Sequence[str], what: str) -> None:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(
                f"{self.path}: tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                f"of {what} missing from the safetensors files"
            )

    def read(self, names: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Copies (owning their memory) of ``names``; floating tensors cast to ``dtype``,
        as ``from_pretrained(dtype=...)`` does."""
        from safetensors.torch import safe_open

        self.require(names, "the model")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(str(self.path / fname), framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
        return {n: out[n] for n in names}


@dataclass
class StreamResult:
    path: Path
    stats: list[dict]  # per pruned linear, as pruning.PruneResult.stats
    layers: list[dict]  # manifest entries of the packed linears
    files: dict[str, int]
    seconds: float
    peak_rss_mb: float  # of this process, since it started
    calibration: dict | None = None
    timings: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=lambda: {"method": "uniform"})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _swap(root: nn.Module, name: str, storage: str) -> SparseLinear:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    packed = SparseLinear.from_linear(getattr(parent, child), storage=storage)
    setattr(parent, child, packed)
    return packed


def build_skeleton(source: str | os.PathLike, dtype: torch.dtype):
    """The model of ``source``'s config.json with allocated but untouched weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(source)
    # Parameters come from torch.empty and are never written: large ones are fresh
    # anonymous mappings that cost no RSS until touched; each is replaced (assign=True)
    # by a tensor read from the shards, or moved to meta, before anything reads it.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def stream_prune_pack(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str,
    sparsity: float,
    granularity: str = "row",
    allocation="uniform",
    percdamp: float | None = None,
    block_size: int | None = None,
    skip: Sequence[str] | None = None,
    prune_include: Sequence[str] | None = None,
    calibration_ids: torch.Tensor | None = None,
    calibration_info: dict | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    storage: str = "auto",
    dtype: str | torch.dtype = "bfloat16",
    compute_dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    batch_size: int = 8,
    tokenizer=None,
    source_record: dict | None = None,
    recipe: dict | None = None,
    progress: bool = True,
) -> StreamResult:
    """Prune ``source`` (a local HF directory with safetensors weights) layer by layer
    and write the packed artifact to ``out``.

    Arguments mean what they mean in :func:`pruning.prune` (method, sparsity,
    granularity, allocation, percdamp, block_size, skip, ``prune_include`` = its
    ``include``; ``calibration_ids`` is the ``[samples, seqlen]`` token tensor that
    every method but magnitude, and OWL, need) and :func:`sparamx.swap_linears`
    (include, exclude, storage). ``dtype``: the precision the weights are read in and
    the artifact's dense tensors are stored in; ``compute_dtype`` (default ``dtype``):
    what Wanda's calibration forwards run in (fp32 on CPUs without a fast bf16 matmul;
    tensors are read in ``dtype`` first, so the values are the ones that get packed).
    """
    from pruning.driver import _outer_targets, add_realised, prune_outer_linears
    from pruning.layerwise import DEFAULT_SKIP, NEEDS_ACTIVATIONS, capture_layer_inputs

    start = time.perf_counter()
    owl, sgpt = _checked_recipe(method, sparsity, allocation, percdamp, block_size)
    calibrated = NEEDS_ACTIVATIONS[method] or owl is not None
    if calibrated and calibration_ids is None:
        raise ValueError(
            f"{method}{' with owl' if owl else ''} needs calibration_ids "
            "(a [samples, seqlen] token tensor)"
        )
    skip = DEFAULT_SKIP if skip is None else tuple(skip)
    dtype = parse_dtype(dtype)
    # Magnitude runs no forwards: its tensors stay in the storage dtype (less RAM).
    work = parse_dtype(compute_dtype or dtype) if calibrated else dtype
    source, out = Path(source), Path(out)
    st = _Stream(source, dtype, work, include, exclude)

    t0 = time.perf_counter()
    st.load_outer()
    inputs = None
    if calibrated:
        inputs = capture_layer_inputs(st.model, calibration_ids, batch_size)
    timings = {"load_outer_and_capture_s": time.perf_counter() - t0}
    outer_targets = _outer_targets(st.model, st.layers, skip, method, prune_include)

    alloc, targets = {"method": "uniform"}, [sparsity] * len(st.layers)
    if owl is not None:
        t0 = time.perf_counter()
        alloc = _stream_owl(
            st.layers, st.load_layer, inputs, owl, sparsity, skip, prune_include, st.prefix
        )
        targets = [rec["target"] for rec in alloc["layers"]]
        timings["owl_s"] = time.perf_counter() - t0
    states = inputs.states if inputs and NEEDS_ACTIVATIONS[method] else None

    st.pack_tied_head(storage)
    st.open(out, max_shard_bytes)
    t0 = time.perf_counter()
    stats, states, held = st.prune_layers(
        states,
        inputs,
        targets,
        storage,
        {"desc": f"stream {method} {sparsity:.0%}", "disable": not progress},
        method=method,
        granularity=granularity,
        skip=skip,
        include=prune_include,
        **sgpt,
    )
    timings["layers_s"] = time.perf_counter() - t0
    timings["statistics_peak_mb"] = held / 2**20

    outer_stats, _ = prune_outer_linears(
        st.base, outer_targets, states, method, sparsity, granularity, False, **sgpt
    )
    stats += outer_stats
    del states, inputs
    files = st.close(storage)
    layer_list = st.write_manifest(tokenizer, files, source_record, recipe)
    seconds = time.perf_counter() - start
    result = StreamResult(
        out,
        stats,
        layer_list,
        files,
        seconds,
        peak_rss_mb(),
        calibration_info,
        timings,
        add_realised(alloc, stats),
    )
    log.info(
        "streamed %d decoder layers of %s into %s in %.0f s (peak RSS %.2f GiB)",
        len(st.layers),
        source,
        out,
        seconds,
        result.peak_rss_mb / 1024,
    )
    return result


def _checked_recipe(method: str, sparsity: float, allocation, percdamp, block_size):
    """The recipe's checks: the OWL allocation (None: uniform) and SparseGPT's settings."""
    from pruning.layerwise import check_method
    from pruning.owl import resolve_allocation
    from pruning.scores import check_sparsity
    from pruning.sparsegpt import BLOCK_SIZE, PERCDAMP

    check_method(method)
    check_sparsity(sparsity)
    owl = resolve_allocation(allocation)
    sgpt = {
        "percdamp": PERCDAMP if percdamp is None else percdamp,
        "block_size": BLOCK_SIZE if block_size is None else block_size,
    }
    return owl, sgpt


class _Stream:
    """The model skeleton of one :func:`stream_prune_pack` and the artifact it writes:
    decoder layers are read from the checkpoint, pruned, packed, written and freed one
    at a time; what precedes and follows them (embeddings, norm, head) stays loaded."""

    def __init__(self, source: Path, dtype: torch.dtype, work: torch.dtype, include, exclude):
        from pruning.layerwise import decoder_layers

        self.source, self.dtype, self.work = source, dtype, work
        self.include, self.exclude = include, exclude
        self.ckpt = SafetensorsCheckpoint(source)
        self.model = model = build_skeleton(source, work)
        self.base, self.layers = decoder_layers(model)
        self.prefix = {id(m): n for n, m in model.named_modules()}[id(self.layers)] + "."
        expected = list(model.state_dict())
        self.layer_keys = [
            [k for k in expected if k.startswith(f"{self.prefix}{i}.")]
            for i in range(len(self.layers))
        ]
        self.outer_keys = [k for k in expected if not k.startswith(self.prefix)]
        for i, keys in enumerate(self.layer_keys):
            self.ckpt.require(keys, f"decoder layer {i}")
        unexpected = sorted(set(self.ckpt.keys()) - set(expected))
        if unexpected:
            log.warning(
                "ignoring %d tensors the model does not use: %s", len(unexpected), unexpected[:5]
            )
        self.selected = set(linear_names(model, include, exclude))
        self.records: dict[str, dict] = {}  # packed linear -> its manifest record
        self.tied: dict[str, str] = {}
        self.first_dtype: list[torch.dtype] = []
        self.outer_seen: dict = {}

    def read(self, keys) -> dict[str, torch.Tensor]:
        tensors = self.ckpt.read(keys, self.dtype)  # rounded to the storage dtype ...
        if self.work != self.dtype:  # ... then widened for the forwards
            tensors = {
                k: t.to(self.work) if t.is_floating_point() else t for k, t in tensors.items()
            }
        return tensors

    def load_layer(self, i: int) -> nn.Module:
        lp = f"{self.prefix}{i}."
        tensors = self.read(self.layer_keys[i])
        self.layers[i].load_state_dict(
            {k[len(lp) :]: v for k, v in tensors.items()}, strict=True, assign=True
        )
        return self.layers[i]

    def load_outer(self) -> None:
        """Embeddings, final norm, head: loaded once and kept. A head tied to the
        embeddings is not in the safetensors (save_pretrained stores it once):
        tie_weights restores it."""
        model, weight_map = self.model, self.ckpt.weight_map
        outer = self.read([k for k in self.outer_keys if k in weight_map])
        model.load_state_dict(outer, strict=False, assign=True)
        del outer
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in weight_map}
        absent = [
            k
            for k, t in model.state_dict().items()
            if not k.startswith(self.prefix) and k not in weight_map and t.data_ptr() not in loaded
        ]
        if absent:
            raise CheckpointError(
                f"{self.source}: tensor(s) {absent} missing from the safetensors files"
            )

    def pack_tied_head(self, storage: str) -> None:
        """A head tied to the embeddings is never pruned (_outer_targets refuses); packing
        it now lets the embedding share its packed copy before the embedding is written."""
        model = self.model
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        emb = model.get_input_embeddings()
        if head_name in self.selected and head.weight.data_ptr() == emb.weight.data_ptr():
            _swap(model, head_name, storage)
            share_tied_embedding(model)

    def emit(self, items, seen: dict) -> None:
        tensors, aliases = dedupe_tensors(items, seen)
        self.tied.update(aliases)
        for name, t in tensors.items():
            # Packed tensors keep their own dtypes (bf16 values, fp32 int8 scales); dense
            # ones are stored as read, not in the work dtype.
            dense = t.is_floating_point() and not name.endswith((".values", ".scales"))
            if dense and t.dtype != self.dtype:
                t = t.to(self.dtype)
            if not self.first_dtype and dense:
                self.first_dtype.append(t.dtype)
            self.writer.add(name, t)

    def open(self, out: Path, max_shard_bytes: int) -> None:
        """Start the artifact and write what precedes the decoder layers (embeddings): the
        order of the in-memory save, state_dict order (before, the layers, after)."""
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # invalid until the new manifest lands
        self.writer = ShardWriter(out, max_shard_bytes)
        keys = list(self.model.state_dict())
        first = next(i for i, k in enumerate(keys) if k.startswith(self.prefix))
        sd = self.model.state_dict()
        self.emit(((k, sd[k]) for k in keys[:first]), self.outer_seen)

    def prune_layer(self, i: int, states, kwargs, storage: str, **prune):
        """Read decoder layer ``i``, prune it, pack its selected linears, write it, free it."""
        from pruning.layerwise import prune_decoder_layer

        layer = self.load_layer(i)
        lp = f"{self.prefix}{i}."
        res = prune_decoder_layer(layer, states, kwargs, prefix=lp, layer_index=i, **prune)
        for n, m in list(layer.named_modules()):
            if isinstance(m, nn.Linear) and lp + n in self.selected:
                self.records[lp + n] = layer_record(lp + n, _swap(layer, n, storage))
        self.emit(layer.state_dict(prefix=lp).items(), {})
        # The writer holds the packed tensors until their shard is written; the dense
        # weights and the layer's modules go now.
        layer.to("meta")
        return res

    def prune_layers(self, states, inputs, targets, storage: str, bar: dict, **prune):
        """Every decoder layer in turn (:meth:`prune_layer`), the calibration states
        passed from one to the next; returns the layer stats, the states after the last
        layer and the peak bytes of pruning statistics held. ``bar``: tqdm's desc and
        disable."""
        bar = tqdm(range(len(self.layers)), unit="layer", **bar)
        stats, held = [], 0
        for i in bar:
            res = self.prune_layer(
                i,
                states,
                inputs.kwargs[i] if states is not None else None,
                storage,
                sparsity=targets[i],
                **prune,
            )
            states = res.states
            stats += res.stats
            held = max(held, res.statistics_bytes)
            bar.set_postfix(peak_rss=f"{peak_rss_mb() / 1024:.1f}G")
        return stats, states, held

    def close(self, storage: str) -> list[str]:
        """Pack the selected linears outside the decoder layers, write what follows the
        layers (norm, head) and close the shards; returns the shard files."""
        model = self.model
        for name in sorted(self.selected):
            mod = model.get_submodule(name)
            if not name.startswith(self.prefix) and type(mod) is nn.Linear:
                _swap(model, name, storage)
        share_tied_embedding(model)
        sd = model.state_dict()
        last = max(i for i, k in enumerate(sd) if k.startswith(self.prefix))
        self.emit(((k, t) for j, (k, t) in enumerate(sd.items()) if j > last), self.outer_seen)
        del sd
        return self.writer.close()

    def write_manifest(self, tokenizer, files, source_record, recipe) -> list[dict]:
        """The manifest and the tokenizer / config files; returns the layer records."""
        from transformers import AutoTokenizer, GenerationConfig

        model, source = self.model, self.source
        order = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
        for name in order:
            if name not in self.records:
                self.records[name] = layer_record(name, model.get_submodule(name))
        layer_list = [self.records[n] for n in order]
        if not layer_list:
            raise ValueError(
                f"include={self.include} exclude={self.exclude} select no linear of {source}"
            )
        head_of = {id(m.values): n for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        packed_embeddings = {
            n: head_of[id(m.values)]
            for n, m in model.named_modules()
            if isinstance(m, PackedEmbedding)
        }
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            generation_config = model.generation_config
        write_metadata(
            self.out,
            model.config,
            generation_config,
            tokenizer,
            layers=layer_list,
            tied=self.tied,
            packed_embeddings=packed_embeddings,
            files=files,
            dtype=self.first_dtype[0] if self.first_dtype else torch.bfloat16,
            tensor_records=self.writer.records,
            source=source_record,
            recipe=recipe,
            eval_summary=None,
        )
        return layer_list


def _stream_owl(layers, load_layer, inputs, owl, sparsity, skip, include, prefix) -> dict:
    """OWL's allocation from one dense pass, each layer read from the shards and freed."""
    from pruning.driver import owl_allocation

    return owl_allocation(
        layers,
        inputs,
        owl,
        sparsity,
        skip=skip,
        include=include,
        prefix=prefix,
        load_layer=load_layer,
        release_layer=lambda i: layers[i].to("meta"),
    )


def main(argv=None) -> int:
    """``python -m sparamx.pipeline.streaming SRC OUT``: prune + pack one model directory (the
    pipeline's pack stage does the same with a config; this is the bare tool)."""
    import argparse
    import sys

    from ..artifact import atomic_write_json

    ap = argparse.ArgumentParser(description="Stream-prune and pack a safetensors model.")
    ap.add_argument("source", help="local HF model directory with safetensors weights")
    ap.add_argument("out", help="artifact directory to write")
    ap.add_argument(
        "--method", default="magnitude", choices=("magnitude", "wanda", "ria", "sparsegpt")
    )
    ap.add_argument("--allocation", default="uniform", choices=("uniform", "owl"))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--granularity", default="row", choices=("row", "layer"))
    ap.add_argument("--calib-source", default="wikipedia", help="wikipedia or c4")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument(
        "--compute-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="dtype of the calibration forwards (auto: by CPU, see sparamx.cpu)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from ..cpu import resolve_compute_dtype

    compute = resolve_compute_dtype(args.compute_dtype)
    log.info("compute dtype %s (%s)", compute.resolved, compute.reason)
    ids, info = None, None
    if args.method != "magnitude" or args.allocation != "uniform":
        from transformers import AutoTokenizer

        from pruning.calibration import Calibration, load_calibration

        calib = Calibration(args.calib_source, args.calib_samples, args.calib_seqlen, 0)
        ids = load_calibration(AutoTokenizer.from_pretrained(args.source), calib)
        info = {"source": args.calib_source, "samples": ids.shape[0], "seqlen": ids.shape[1]}
    recipe = {"method": args.method, "sparsity": args.sparsity, "granularity": args.granularity}
    if args.allocation != "uniform":
        recipe["allocation"] = args.allocation
    res = stream_prune_pack(
        args.source,
        args.out,
        method=args.method,
        sparsity=args.sparsity,
        granularity=args.granularity,
        allocation=args.allocation,
        skip=["lm_head"],
        calibration_ids=ids,
        calibration_info=info,
        exclude=[],
        compute_dtype=compute.resolved,
        max_shard_bytes=int(args.shard_gb * (1 << 30)),
        batch_size=args.batch_size,
        recipe={**recipe, "calibration": info},
    )
    atomic_write_json(
        Path(args.out).parent / f"{Path(args.out).name}.stream.json",
        {
            "seconds": res.seconds,
            "peak_rss_mb": res.peak_rss_mb,
            "timings": res.timings,
            "allocation": res.allocation,
        },
    )
    print(
        f"{len(res.layers)} linears packed into {args.out} in {res.seconds:.0f} s, "
        f"peak RSS {res.peak_rss_mb / 1024:.2f} GiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
