"""Layer-by-layer pruning of a decoder stack, written once for every method.

As in the Wanda paper, calibration hidden states flow through decoder layer i, hooks gather
the squared input norms of every linear of the layer, the layer is pruned, and the states
are run through the *pruned* layer to become layer i+1's inputs. Only one decoder layer's
weights and the calibration states need to be resident, so a streaming caller (e.g. an 8B
model read from safetensors shards layer by layer) can call :func:`prune_decoder_layer`
itself with the states and kwargs from :func:`capture_layer_inputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparamx.select import is_selected, matches_any

from .owl import outlier_ratio
from .scores import magnitude_score, mask_from_scores, ria_score, wanda_score
from .sparsegpt import BLOCK_SIZE, PERCDAMP, input_hessians, sparsegpt_prune

# Methods by name; the driver passes explicit arguments, never an options bag. Score
# methods rank weights once; sparsegpt also updates the kept weights (OBS).
METHODS = ("magnitude", "wanda", "ria", "sparsegpt")
NEEDS_ACTIVATIONS = {"magnitude": False, "wanda": True, "ria": True, "sparsegpt": True}
DEFAULT_SKIP = ("lm_head", "embed_tokens")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {METHODS}")
    return method


def is_skipped(name: str, skip: Sequence[str]) -> bool:
    """``name`` matches a skip entry exactly, as a dotted suffix ("mlp.down_proj"), as a
    glob ("model.layers.0.*") or as a ``re:`` regex (:mod:`sparamx.select`, the pattern
    language packing uses too)."""
    return matches_any(name, skip)


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(base model, its decoder layers) of a causal LM (``model.model.layers``) or of a bare
    decoder (``model.layers``)."""
    for base in (getattr(model, "model", None), model):
        layers = getattr(base, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return base, layers
    raise ValueError(
        f"{type(model).__name__} has no decoder layers: expected a non-empty nn.ModuleList at "
        "`model.model.layers` or `model.layers` (Llama, Qwen2, Mistral, Gemma-style decoders)"
    )


# --------------------------------------------------------------------------- capture
@dataclass
class LayerInputs:
    """Calibration inputs of the decoder stack, in batches.

    ``states[b]``: hidden states entering layer 0 for batch b, ``[B, L, H]``.
    ``kwargs[i][b]``: keyword arguments the model passes to layer i for batch b (attention
    mask, position embeddings, position ids, ...). They are per layer because models with
    sliding-window layers give each layer type its own mask.
    """

    states: list[torch.Tensor]
    kwargs: list[list[dict]] = field(default_factory=list)


def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8
) -> LayerInputs:
    """Run the embedding/mask/rotary part of ``model`` on ``input_ids`` and record what each
    decoder layer would receive, without running any layer.

    Every layer's ``forward`` is replaced for the duration by a recorder that returns its
    input unchanged: the model's own code builds the masks and position embeddings (so
    sliding windows, GQA and Gemma's embedding scale come out right), and layer weights are
    never touched, so they may still be on the meta device in a streaming set-up.
    """
    base, layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    captured = LayerInputs(states=[], kwargs=[[] for _ in layers])

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise RuntimeError(
                    f"decoder layer {i} got {len(args)} positional arguments; "
                    "only hidden_states is supported positionally"
                )
            if i == 0:
                captured.states.append(hidden)
            captured.kwargs[i].append(kwargs)
            return hidden

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)  # instance attribute shadows the class's forward
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
    return captured


# --------------------------------------------------------------------------- one layer
@contextlib.contextmanager
def input_sq_norms(linears: dict[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, accumulate sum over tokens of x_j^2 for the input of each linear.

    A plain sum, not Wanda's running mean: every column of a layer sees the same tokens, so
    the scale cancels in any ranking of one weight matrix.
    """
    sq = {
        name: torch.zeros(
            lin.in_features,
            dtype=torch.float64 if lin.weight.dtype == torch.float64 else torch.float32,
            device=lin.weight.device,
        )
        for name, lin in linears.items()
    }

    def hook(name: str):
        def pre_hook(module, args):
            x = args[0]
            sq[name] += x.reshape(-1, x.shape[-1]).to(sq[name].dtype).pow(2).sum(0)

        return pre_hook

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        yield sq
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def calibration_statistics(
    linears: dict[str, nn.Linear], method: str
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, gather what ``method`` needs from each linear's inputs: squared
    column norms (wanda, ria), the Hessian X^T X (sparsegpt), nothing (magnitude)."""
    if method == "sparsegpt":
        with input_hessians(linears) as hs:
            yield hs
    elif NEEDS_ACTIVATIONS[method]:
        with input_sq_norms(linears) as sq:
            yield sq
    else:
        yield {}


def prune_linear(
    linear: nn.Linear,
    method: str,
    sparsity: float,
    granularity: str = "row",
    statistic: torch.Tensor | None = None,
    *,
    name: str = "linear",
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Prune ``linear.weight`` in place; return the keep-mask (bool, weight's shape).

    ``statistic``: from :func:`calibration_statistics` (squared input norms, or the
    Hessian for sparsegpt); ``percdamp`` and ``block_size`` are sparsegpt's.
    """
    check_method(method)
    w = linear.weight
    if NEEDS_ACTIVATIONS[method] and statistic is None:
        raise ValueError(f"{name}: {method} needs the calibration statistics of the linear")
    if method == "sparsegpt":
        pruned, keep = sparsegpt_prune(
            w, statistic, sparsity, granularity, percdamp=percdamp, block_size=block_size, name=name
        )
        with torch.no_grad():
            w.copy_(pruned)
        return keep
    if method == "magnitude":
        scores = magnitude_score(w)
    elif method == "wanda":
        scores = wanda_score(w, statistic)
    else:
        scores = ria_score(w, statistic)
    keep = mask_from_scores(scores, sparsity, granularity)
    with torch.no_grad():
        w.masked_fill_(~keep, 0)
    return keep


def linear_stats(
    name: str, linear: nn.Linear, method: str, sparsity: float, granularity: str, layer: int | None
) -> dict:
    """One row of the per-layer table; plain types only, so it serializes as JSON."""
    w = linear.weight
    zeros = int((w == 0).sum())
    return {
        "name": name,
        "layer": layer,
        "shape": list(w.shape),
        "method": method,
        "granularity": granularity,
        "target": sparsity,
        "sparsity": zeros / w.numel(),
        "nnz": w.numel() - zeros,
    }


def _hidden(out):
    # transformers >= 5 decoder layers return a tensor; older ones a tuple (hidden, ...).
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerResult:
    states: list[torch.Tensor] | None
    stats: list[dict]
    masks: dict[str, torch.Tensor] | None
    statistics_bytes: int = 0  # calibration statistics held at once (sparsegpt: Hessians)


def selected_linears(
    layer: nn.Module, prefix: str, skip: Sequence[str], include: Sequence[str] | None
) -> dict[str, nn.Linear]:
    """The linears of ``layer`` to prune, by global name."""
    return {
        prefix + n: m
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and is_selected(prefix + n, include, skip)
    }


def _batch_kwargs(kwargs, states: list) -> list[dict]:
    kw = list(kwargs) if isinstance(kwargs, (list, tuple)) else [kwargs or {}] * len(states)
    if len(kw) != len(states):
        raise ValueError(f"{len(states)} state batches but {len(kw)} kwargs dicts")
    return kw


def layer_outlier_ratio(
    layer: nn.Module,
    states: list[torch.Tensor],
    kwargs: dict | Sequence[dict] | None,
    *,
    m: float,
    skip: Sequence[str] = DEFAULT_SKIP,
    include: Sequence[str] | None = None,
    prefix: str = "",
) -> tuple[float, int]:
    """OWL's (outlier ratio, prunable weights) of ONE dense decoder layer; ``states`` is
    overwritten in place with the dense layer's outputs, the next layer's inputs."""
    linears = selected_linears(layer, prefix, skip, include)
    kw = _batch_kwargs(kwargs, states)
    device = next(layer.parameters()).device
    with torch.no_grad(), input_sq_norms(linears) as sq:
        for b, (h, k) in enumerate(zip(states, kw, strict=True)):
            states[b] = _hidden(layer(h.to(device), **k))
    scores = [wanda_score(lin.weight, sq[n]) for n, lin in linears.items()]
    return outlier_ratio(scores, m), sum(lin.weight.numel() for lin in linears.values())


def prune_decoder_layer(
    layer: nn.Module,
    states: list[torch.Tensor] | None,
    kwargs: dict | Sequence[dict] | None,
    *,
    method: str,
    sparsity: float,
    granularity: str = "row",
    skip: Sequence[str] = DEFAULT_SKIP,
    prefix: str = "",
    layer_index: int | None = None,
    return_masks: bool = False,
    include: Sequence[str] | None = None,
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
) -> LayerResult:
    """Prune the linears of ONE decoder layer and return the states for the next layer.

    ``states``: batches of this layer's input hidden states (pruned layers before it already
    applied); the list is overwritten in place with the pruned layer's outputs, so only one
    copy of the calibration states is alive. ``kwargs``: the layer's keyword arguments, one
    dict for all batches or one per batch (see :class:`LayerInputs`). Magnitude needs
    neither: pass ``states=None``. ``prefix`` makes the names in the statistics global
    ("model.layers.3."). ``include``: patterns choosing the linears to prune (None: all
    but ``skip``). ``percdamp``, ``block_size``: sparsegpt's damping and column block.
    """
    check_method(method)
    linears = selected_linears(layer, prefix, skip, include)
    if states is not None:
        kw = _batch_kwargs(kwargs, states)
        device = next(layer.parameters()).device
    elif NEEDS_ACTIVATIONS[method]:
        raise ValueError(f"{method} needs the layer's calibration input states")
    with torch.no_grad():
        stat = {}
        if NEEDS_ACTIVATIONS[method]:
            # Pass 1: the dense layer on the incoming states, recording input statistics.
            with calibration_statistics(linears, method) as stat:
                for h, k in zip(states, kw, strict=True):
                    layer(h.to(device), **k)
        held = sum(t.numel() * t.element_size() for t in stat.values())
        masks = {}
        stats = []
        for name, lin in linears.items():
            keep = prune_linear(
                lin,
                method,
                sparsity,
                granularity,
                stat.pop(name, None),  # freed as soon as its linear is done
                name=name,
                percdamp=percdamp,
                block_size=block_size,
            )
            stats.append(linear_stats(name, lin, method, sparsity, granularity, layer_index))
            if return_masks:
                masks[name] = keep
        if states is not None:
            # Pass 2: the pruned layer produces what the next layer will see.
            for b, (h, k) in enumerate(zip(states, kw, strict=True)):
                states[b] = _hidden(layer(h.to(device), **k))
    return LayerResult(
        states=states, stats=stats, masks=masks if return_masks else None, statistics_bytes=held
    )
