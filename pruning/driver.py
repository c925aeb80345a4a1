"""``prune()``: the whole-model entry point over :mod:`pruning.layerwise`, plus the report.

It captures the calibration inputs of layer 0, walks the decoder layers in order with a
progress bar, optionally prunes a non-tied ``lm_head`` from the final-norm outputs, and
returns per-linear statistics (a list of plain dicts) and, on request, the masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparamx.select import check_patterns, is_selected, unmatched

from .calibration import Calibration, resolve_calibration
from .layerwise import (
    DEFAULT_SKIP,
    NEEDS_ACTIVATIONS,
    capture_layer_inputs,
    check_method,
    decoder_layers,
    input_sq_norms,
    is_skipped,
    linear_stats,
    prune_decoder_layer,
    prune_linear,
)
from .scores import GRANULARITIES, check_sparsity

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
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Prune the linears outside the decoder layers (see ``_outer_targets``); with
    calibration ``states`` (the last layer's outputs) a head sees them through the final
    norm, as in the model's forward. Shared with the streaming path."""
    stats, masks = [], {}
    for name, lin in outer.items():
        with torch.no_grad(), input_sq_norms({name: lin}) as sq:
            if states is not None:
                final_norm = getattr(base, "norm", None)
                final_norm = nn.Identity() if final_norm is None else final_norm
                for h in states:
                    lin(final_norm(h))
        keep = prune_linear(lin, method, sparsity, granularity, sq[name] if states else None)
        stats.append(linear_stats(name, lin, method, sparsity, granularity, None))
        if return_masks:
            masks[name] = keep
    return stats, masks


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    tokenizer=None,
    calibration: Calibration | str | torch.Tensor | None = None,
    granularity: str = "row",
    skip: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    return_masks: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> PruneResult:
    """Prune the linear weights of a transformers causal LM in place, layer by layer.

    method: "magnitude" (|W|) or "wanda" (|W| * ||X||, calibration needed).
    sparsity: fraction of zeros in [0, 1), exact per comparison group.
    granularity: "row" (each output row; Wanda's default) or "layer" (whole matrix).
    calibration: None (offline Wikipedia set, tokenized with ``tokenizer``), a source name
        ("wikipedia", "c4"), a :class:`Calibration`, or a LongTensor ``[samples, seqlen]``.
    skip: module patterns (exact, dotted suffix, glob or ``re:`` regex; see
        :mod:`sparamx.select`) left dense; default lm_head and embeddings.
    include: patterns choosing the linears to prune (None: every linear not skipped),
        e.g. ``["*.mlp.*"]`` for the MLP projections only.
    return_masks: also return the boolean keep-masks (True = kept) by module name.
    batch_size: calibration samples per layer call; bounds activation memory.
    """
    check_method(method)
    sparsity = check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    skip = DEFAULT_SKIP if skip is None else tuple(skip)
    include = None if include is None else tuple(check_patterns(include, "include"))
    base, layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    for s in skip:
        if s not in DEFAULT_SKIP and not any(is_skipped(n, [s]) for n in names.values()):
            log.warning("skip entry %r matches no module of %s", s, type(model).__name__)
    for s in unmatched(include, names.values()):
        log.warning("include entry %r matches no module of %s", s, type(model).__name__)
    outer = _outer_targets(model, layers, skip, method, include)
    prefix = names[id(layers)] + "."

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        calib_info, inputs = None, None
        if NEEDS_ACTIVATIONS[method]:
            ids, calib_info = resolve_calibration(calibration, tokenizer)
            inputs = capture_layer_inputs(model, ids, batch_size)
        states = inputs.states if inputs else None
        stats, masks = [], {}
        bar = tqdm(layers, desc=f"{method} {sparsity:.0%}", unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            res = prune_decoder_layer(
                layer,
                states,
                inputs.kwargs[i] if inputs else None,
                method=method,
                sparsity=sparsity,
                granularity=granularity,
                skip=skip,
                prefix=f"{prefix}{i}.",
                layer_index=i,
                return_masks=return_masks,
                include=include,
            )
            states = res.states
            stats += res.stats
            masks.update(res.masks or {})
        outer_stats, outer_masks = prune_outer_linears(
            base, outer, states, method, sparsity, granularity, return_masks
        )
        stats += outer_stats
        masks.update(outer_masks)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    result = PruneResult(
        method, sparsity, granularity, stats, calib_info, seconds, masks if return_masks else None
    )
    log.info(
        "pruned %d linears with %s at %.0f%% (%s) in %.1f s\n%s",
        len(stats),
        method,
        100 * sparsity,
        granularity,
        seconds,
        result.table(),
    )
    return result
