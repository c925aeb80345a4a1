"""``prune()``: the whole-model entry point over :mod:`pruning.layerwise`, plus the report.

It captures the calibration inputs of layer 0, walks the decoder layers in order with a
progress bar, optionally prunes a non-tied ``lm_head`` from the final-norm outputs, and
returns per-linear statistics (a list of plain dicts) and, on request, the masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparamx.select import check_patterns, is_selected, unmatched

from .calibration import Calibration, resolve_calibration
from .layerwise import (
    DEFAULT_SKIP,
    NEEDS_ACTIVATIONS,
    LayerInputs,
    calibration_statistics,
    capture_layer_inputs,
    check_method,
    decoder_layers,
    is_skipped,
    layer_outlier_ratio,
    linear_stats,
    prune_decoder_layer,
    prune_linear,
)
from .owl import OWL, owl_sparsities, resolve_allocation
from .scores import GRANULARITIES, check_sparsity
from .sparsegpt import BLOCK_SIZE, PERCDAMP

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    method: str
    sparsity: float
    granularity: str
    stats: list[dict]  # one plain dict per pruned linear, in model order
    calibration: dict | None  # settings of the calibration set (None for magnitude)
    seconds: float
    masks: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # "uniform", or OWL's settings with per decoder layer: outlier ratio, target, realised
    allocation: dict = field(default_factory=lambda: {"method": "uniform"})
    statistics_mb: float = 0.0  # largest calibration statistics of one layer (Hessians)

    def table(self) -> str:
        return format_table(self.stats)

    def to_dict(self) -> dict:
        """JSON-ready summary (without masks) for the pipeline's report."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "granularity": self.granularity,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "allocation": self.allocation,
            "statistics_mb": self.statistics_mb,
            "layers": self.stats,
        }


def format_table(stats: Sequence[dict]) -> str:
    """Fixed-width per-linear table with a total row (sparsity over all pruned weights)."""
    width = max([len(s["name"]) for s in stats] + [4])
    lines = [f"{'name':<{width}}  {'shape':>12}  {'method':>9}  {'sparsity':>8}"]
    for s in stats:
        shape = "x".join(map(str, s["shape"]))
        lines.append(f"{s['name']:<{width}}  {shape:>12}  {s['method']:>9}  {s['sparsity']:>8.4f}")
    numel = sum(s["shape"][0] * s["shape"][1] for s in stats)
    nnz = sum(s["nnz"] for s in stats)
    total = 1 - nnz / numel if numel else 0.0
    lines.append(
        f"{'total (' + str(len(stats)) + ' linears)':<{width}}  {numel:>12}  {'':>9}  {total:>8.4f}"
    )
    return "\n".join(lines)


def _outer_targets(
    model: nn.Module,
    layers: nn.ModuleList,
    skip: Sequence[str],
    method: str,
    include: Sequence[str] | None = None,
) -> dict[str, nn.Linear]:
    """Linears outside the decoder layers that the skip list lets through (normally none)."""
    inside = {id(m) for m in layers.modules()}
    out = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and is_selected(n, include, skip)
    }
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, lin in out.items():
        if lin is head:
            emb = model.get_input_embeddings()
            if emb is not None and emb.weight.data_ptr() == lin.weight.data_ptr():
                raise ValueError(
                    f"{name} shares its weight with the input embeddings (tied); "
                    f"pruning it would prune the embeddings too: keep it in skip"
                )
        elif NEEDS_ACTIVATIONS[method]:
            raise ValueError(
                f"{name} is outside the decoder layers and is not the output "
                f"head: no calibration inputs for {method}; add it to skip"
            )
    return out


def prune_outer_linears(
    base: nn.Module,
    outer: dict[str, nn.Linear],
    states: list[torch.Tensor] | None,
    method: str,
    sparsity: float,
    granularity: str,
    return_masks: bool = False,
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Prune the linears outside the decoder layers (see ``_outer_targets``); with
    calibration ``states`` (the last layer's outputs) a head sees them through the final
    norm, as in the model's forward. Shared with the streaming path."""
    stats, masks = [], {}
    for name, lin in outer.items():
        wanted = method if states is not None else "magnitude"
        with torch.no_grad(), calibration_statistics({name: lin}, wanted) as stat:
            if states is not None:
                final_norm = getattr(base, "norm", None)
                final_norm = nn.Identity() if final_norm is None else final_norm
                for h in states:
                    lin(final_norm(h))
        keep = prune_linear(
            lin,
            method,
            sparsity,
            granularity,
            stat.get(name),
            name=name,
            percdamp=percdamp,
            block_size=block_size,
        )
        stats.append(linear_stats(name, lin, method, sparsity, granularity, None))
        if return_masks:
            masks[name] = keep
    return stats, masks


def owl_allocation(
    layers: nn.ModuleList,
    inputs: LayerInputs,
    owl: OWL,
    sparsity: float,
    *,
    skip: Sequence[str],
    include: Sequence[str] | None,
    prefix: str,
    progress: bool = True,
    load_layer: Callable[[int], nn.Module] | None = None,
    release_layer: Callable[[int], None] | None = None,
) -> dict:
    """OWL's per-layer sparsities from one pass of the calibration states through the
    dense layers (``inputs.states`` is left as it was). ``load_layer(i)`` /
    ``release_layer(i)``: for a caller that holds one layer in memory at a time
    (streaming); by default ``layers[i]`` is used as it is."""
    states = [h.clone() for h in inputs.states]
    ratios, numels = [], []
    bar = tqdm(range(len(layers)), desc="owl outlier ratios", unit="layer", disable=not progress)
    for i in bar:
        r, n = layer_outlier_ratio(
            load_layer(i) if load_layer else layers[i],
            states,
            inputs.kwargs[i],
            m=owl.m,
            skip=skip,
            include=include,
            prefix=f"{prefix}{i}.",
        )
        if release_layer:
            release_layer(i)
        ratios.append(r)
        numels.append(n)
    targets = owl_sparsities(ratios, numels, sparsity, owl.lam)
    return owl_record(owl, ratios, targets)


def owl_record(owl: OWL, ratios: Sequence[float], targets: Sequence[float]) -> dict:
    return {
        "method": "owl",
        "lambda": owl.lam,
        "m": owl.m,
        "layers": [
            {"layer": i, "outlier_ratio": r, "target": t}
            for i, (r, t) in enumerate(zip(ratios, targets, strict=True))
        ],
    }


def add_realised(allocation: dict, stats: Sequence[dict]) -> dict:
    """Each decoder layer's realised sparsity (zeros over its pruned weights)."""
    for rec in allocation.get("layers", []):
        mine = [s for s in stats if s["layer"] == rec["layer"]]
        numel = sum(s["shape"][0] * s["shape"][1] for s in mine)
        rec["sparsity"] = 1 - sum(s["nnz"] for s in mine) / numel if numel else 0.0
    return allocation


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    tokenizer=None,
    calibration: Calibration | str | torch.Tensor | None = None,
    granularity: str = "row",
    allocation: str | OWL = "uniform",
    skip: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    return_masks: bool = False,
    batch_size: int = 8,
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
    progress: bool = True,
) -> PruneResult:
    """Prune the linear weights of a transformers causal LM in place, layer by layer.

    method: "magnitude" (|W|), "wanda" (|W| * ||X||), "ria" (relative importance x
        ||X||^0.5) or "sparsegpt" (OBS updates from X^T X); all but magnitude need
        calibration.
    sparsity: fraction of zeros in [0, 1), exact per comparison group.
    granularity: "row" (each output row; Wanda's default) or "layer" (whole matrix).
    allocation: "uniform" (every decoder layer at ``sparsity``) or "owl" / an
        :class:`~pruning.owl.OWL` (per-layer sparsities from outlier ratios, mean
        ``sparsity``; needs calibration whatever the method).
    calibration: None (offline Wikipedia set, tokenized with ``tokenizer``), a source name
        ("wikipedia", "c4"), a :class:`Calibration`, or a LongTensor ``[samples, seqlen]``.
    skip: module patterns (exact, dotted suffix, glob or ``re:`` regex; see
        :mod:`sparamx.select`) left dense; default lm_head and embeddings.
    include: patterns choosing the linears to prune (None: every linear not skipped),
        e.g. ``["*.mlp.*"]`` for the MLP projections only.
    return_masks: also return the boolean keep-masks (True = kept) by module name.
    batch_size: calibration samples per layer call; bounds activation memory.
    percdamp, block_size: sparsegpt's damping (fraction of mean diag H) and column block.
    """
    check_method(method)
    sparsity = check_sparsity(sparsity)
    owl = resolve_allocation(allocation)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    skip = DEFAULT_SKIP if skip is None else tuple(skip)
    include = None if include is None else tuple(check_patterns(include, "include"))
    base, layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    _warn_unmatched(model, names.values(), skip, include)
    outer = _outer_targets(model, layers, skip, method, include)
    prefix = names[id(layers)] + "."

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        calib_info, inputs = None, None
        alloc = {"method": "uniform"}
        if NEEDS_ACTIVATIONS[method] or owl is not None:
            ids, calib_info = resolve_calibration(calibration, tokenizer)
            inputs = capture_layer_inputs(model, ids, batch_size)  # once, for every pass
        targets = [sparsity] * len(layers)
        if owl is not None:
            alloc = owl_allocation(
                layers,
                inputs,
                owl,
                sparsity,
                skip=skip,
                include=include,
                prefix=prefix,
                progress=progress,
            )
            targets = [rec["target"] for rec in alloc["layers"]]
        states = inputs.states if inputs and NEEDS_ACTIVATIONS[method] else None
        stats, masks, held = [], {}, 0
        bar = tqdm(layers, desc=f"{method} {sparsity:.0%}", unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            res = prune_decoder_layer(
                layer,
                states,
                inputs.kwargs[i] if states is not None else None,
                method=method,
                sparsity=targets[i],
                granularity=granularity,
                skip=skip,
                prefix=f"{prefix}{i}.",
                layer_index=i,
                return_masks=return_masks,
                include=include,
                percdamp=percdamp,
                block_size=block_size,
            )
            states = res.states
            stats += res.stats
            masks.update(res.masks or {})
            held = max(held, res.statistics_bytes)
        outer_stats, outer_masks = prune_outer_linears(
            base, outer, states, method, sparsity, granularity, return_masks, percdamp, block_size
        )
        stats += outer_stats
        masks.update(outer_masks)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    result = PruneResult(
        method,
        sparsity,
        granularity,
        stats,
        calib_info,
        seconds,
        masks if return_masks else None,
        add_realised(alloc, stats),
        held / 2**20,
    )
    log.info(
        "pruned %d linears with %s (%s) at %.0f%% (%s) in %.1f s\n%s",
        *(len(stats), method, alloc["method"], 100 * sparsity, granularity, seconds),
        result.table(),
    )
    return result


def _warn_unmatched(model: nn.Module, names, skip: Sequence[str], include) -> None:
    """Warn about skip (beyond the defaults) and include patterns that name no module."""
    names = list(names)
    for s in skip:
        if s not in DEFAULT_SKIP and not any(is_skipped(n, [s]) for n in names):
            log.warning("skip entry %r matches no module of %s", s, type(model).__name__)
    for s in unmatched(include, names):
        log.warning("include entry %r matches no module of %s", s, type(model).__name__)
