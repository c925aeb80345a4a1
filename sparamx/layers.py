"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is packed (bitmap-bf16,
dense-bf16, or their int8 variants) and multiplied by the native kernels, and the helper
that swaps the linears of a transformers model."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import ops as _ops  # noqa: F401  (loads the native ops: torch.ops.sparamx.*)
from .format import DENSE_STORAGES, PackedWeight, pack
from .select import check_patterns, is_selected, unmatched

log = logging.getLogger(__name__)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed. Accepts any leading dims, bf16 or fp32 input
    (fp32 is rounded to bf16 for the product; accumulation is fp32); returns x's dtype."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.storage = packed.storage
        # Buffers, not parameters: the layer is for inference and its tensors load
        # through state_dict / safetensors like any other.
        self.register_buffer("values", packed.values)
        self.register_buffer("bitmap", packed.bitmap)
        self.register_buffer("offsets", packed.offsets)
        self.register_buffer("scales", packed.scales)  # int8 storages only
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    _packed_buffers = ("values", "bitmap", "offsets", "scales")

    def _apply(self, fn, recurse=True):
        return _apply_keeping_packed(self, fn, recurse, super()._apply)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, storage: str = "auto"
    ) -> SparseLinear:
        """Pack ``linear.weight`` (its non-zeros, or the entries ``mask`` keeps)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        return cls(pack(linear.weight, mask, storage=storage), linear.bias)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            (self.out_features, self.in_features),
            self.storage,
            self.values,
            self.bitmap,
            self.offsets,
            self.scales,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (unpacked on demand; for inspection, not for the forward)."""
        return self.packed.unpack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseLinear expects input with {self.in_features} features, got shape "
                f"{tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        n, k = self.out_features, self.in_features
        if self.scales is not None:  # int8 storages
            if self.bitmap is None:
                y = torch.ops.sparamx.dense_linear_int8(
                    x2, self.values, self.scales, self.bias, n, k
                )
            else:
                y = torch.ops.sparamx.sparse_linear_int8(
                    x2, self.bitmap, self.values, self.offsets, self.scales, self.bias, n, k
                )
        elif self.bitmap is None:
            y = torch.ops.sparamx.dense_linear(x2, self.values, self.bias, n, k)
        else:
            y = torch.ops.sparamx.sparse_linear(
                x2, self.bitmap, self.values, self.offsets, self.bias, n, k
            )
        return y.reshape(*lead, n)

    def extra_repr(self) -> str:
        nnz = int(self.offsets[-1]) if self.offsets is not None else None
        sp = (
            ""
            if nnz is None
            else f", sparsity={1 - nnz / (self.out_features * self.in_features):.3f}"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"storage={self.storage}, bias={self.bias is not None}{sp}"
        )


def _apply_keeping_packed(module: nn.Module, fn, recurse: bool, base_apply, probe_dtype=None):
    """``nn.Module._apply`` (what ``to``, ``float``, ``half``, ``cpu``... run) for a
    module holding packed tensors, whose dtype is the format's, not the model's:
    ``model.to(torch.float32)`` converts the rest of the model (the bias too) and leaves
    the packed bf16 in place, still shared with a tied embedding. Moves to ``meta`` (the
    streaming writer frees layers that way) apply; another device is refused, the
    kernels run on the CPU. Returns the probe's result (what ``fn`` makes of a
    ``probe_dtype`` tensor)."""
    probe = fn(torch.zeros(1, dtype=probe_dtype or torch.bfloat16))
    keep_as_is = probe.device.type == "cpu" and probe.dtype != torch.bfloat16
    if probe.device.type not in ("cpu", "meta"):
        raise RuntimeError(
            f"{type(module).__name__}: packed weights run on the CPU only, cannot move them "
            f"to {probe.device}"
        )
    held = {n: module._buffers.pop(n) for n in module._packed_buffers if n in module._buffers}

    def apply(t):
        if t is None or keep_as_is:
            return t
        out = fn(t)
        # On the CPU the packed tensors keep the format's dtypes: model.to(bfloat16)
        # leaves the fp32 int8 scales fp32.
        return t if probe.device.type == "cpu" and out.dtype != t.dtype else out

    try:
        base_apply(fn, recurse)
    finally:
        for n, t in held.items():
            module._buffers[n] = apply(t)
    return probe


class DenseLinear(SparseLinear):
    """``SparseLinear`` in the dense VNNI layout (no bitmap): our own bf16 (or int8) GEMV/GEMM
    for layers that stay dense, such as ``lm_head``; streams weights faster than torch's."""

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, storage: str = "dense-bf16"
    ) -> DenseLinear:
        if storage not in DENSE_STORAGES:
            raise ValueError(
                f"DenseLinear stores dense-int8 or dense-bf16 only, got storage={storage!r}"
            )
        return super().from_linear(linear, mask, storage=storage)


class PackedEmbedding(nn.Module):
    """Embedding lookup that reads its rows from a dense-layout ``SparseLinear`` (a tied
    ``lm_head``): the tied weight is stored once, in the kernels' VNNI layout.

    Row r of the weight lives in column group r // 16 at lane r % 16 of every unit.
    ``embed_scale`` (a 0-d tensor) multiplies the rows, as Gemma-3's
    ``Gemma3TextScaledWordEmbedding`` does (in the output dtype)."""

    _packed_buffers = ("values",)

    def __init__(
        self,
        head: SparseLinear,
        padding_idx: int | None = None,
        embed_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        if head.storage != "dense-bf16":
            raise ValueError(
                "PackedEmbedding needs a dense-bf16 head (a bitmap has no fixed row positions)"
            )
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        self.register_buffer("values", head.values)  # the same tensor: no second copy
        scale = None if embed_scale is None else embed_scale.detach().clone()
        self.register_buffer("embed_scale", scale, persistent=False)
        self.out_dtype = head.values.dtype  # follows model.to(dtype), as a weight would

    @classmethod
    def like(cls, emb: nn.Embedding, head: SparseLinear) -> PackedEmbedding:
        """The packed stand-in of ``emb`` (an ``nn.Embedding`` or a subclass that scales
        its lookup by an ``embed_scale`` buffer) reading ``head``'s weight."""
        scale = getattr(emb, "embed_scale", None)
        out = cls(head, emb.padding_idx, scale if isinstance(scale, torch.Tensor) else None)
        if emb.weight.is_floating_point():
            out.out_dtype = emb.weight.dtype
        return out

    def _apply(self, fn, recurse=True):
        probe = _apply_keeping_packed(self, fn, recurse, super()._apply, self.out_dtype)
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return self

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"PackedEmbedding expects integer ids, got {ids.dtype}")
        units = self.values.view(
            -1, self.values.numel() // (-(-self.num_embeddings // 16) * 32), 16, 2
        )  # [G, P, 16 lanes, 2]
        rows = units[ids // 16, :, ids % 16, :]  # [*ids.shape, P, 2]
        return rows.reshape(*ids.shape, -1)[..., : self.embedding_dim].to(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    @property
    def weight(self) -> torch.Tensor:
        """The dense (unscaled) embedding matrix, as ``nn.Embedding.weight``."""
        return self._rows(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", scale={float(self.embed_scale):g}"
        return f"{self.num_embeddings}, {self.embedding_dim}{scale}, shares lm_head's VNNI layout"


def _lookup_matches(emb: nn.Embedding, packed: PackedEmbedding) -> bool:
    """Whether ``packed`` computes what ``emb`` does, on a probe of ids (first, last and
    spread rows): an ``nn.Embedding`` subclass may do anything in its forward, and only
    a lookup (times ``embed_scale``) can be shared."""
    n = emb.num_embeddings
    ids = torch.unique(torch.linspace(0, n - 1, steps=min(n, 97)).long())
    with torch.no_grad():
        try:
            want = emb(ids)
        except Exception:  # noqa: BLE001  (an exotic forward: not a plain lookup)
            return False
        got = packed(ids)
    return want.dtype == got.dtype and want.shape == got.shape and torch.equal(want, got)


def set_activation_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Run a packed model's other parts in ``dtype``: ``model.to(dtype)`` casts the
    norms, plain embeddings and biases and makes a ``PackedEmbedding`` return rows in
    ``dtype``, while the packed weights stay bf16 (``_apply_keeping_packed``: the
    kernels read bf16 and take bf16 or fp32 input, returning the input's dtype).
    Non-persistent buffers (rotary frequencies, which transformers computes in fp32)
    keep their precision.

    float32 is the choice on CPUs without a bf16 dot product: the packed linears cost
    the same either way, and attention, norms and the residual stream then run on
    torch's fp32 paths instead of its slow bf16 emulation (a prefill's attention
    matmuls are bf16 GEMMs there, ~6x slower than fp32 on a Zen 3)."""
    kept = [
        (mod, name, b)
        for mod in model.modules()
        for name, b in mod._buffers.items()
        if b is not None and b.is_floating_point() and name in mod._non_persistent_buffers_set
    ]
    model.to(dtype)
    for mod, name, b in kept:
        mod._buffers[name] = b
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype  # what transformers reads for masks and caches


def share_tied_embedding(model: nn.Module) -> bool:
    """If ``lm_head`` is a dense-layout ``SparseLinear`` tied to the input embedding (an
    ``nn.Embedding``, or a subclass whose forward is a lookup times ``embed_scale``,
    such as Gemma-3's), make the embedding read from it (one copy of the tied weight).
    Returns whether it did. A packed head that cannot be shared keeps its own copy:
    the config is untied all the same, so that ``tie_weights`` leaves both alone."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, SparseLinear) or not getattr(
        model.config, "tie_word_embeddings", False
    ):
        return False
    ok = (
        head.storage == "dense-bf16"
        and isinstance(emb, nn.Embedding)
        and tuple(emb.weight.shape) == (head.out_features, head.in_features)
    )
    packed = PackedEmbedding.like(emb, head) if ok else None
    if packed is None or not _lookup_matches(emb, packed):
        # An int8 head (or a bitmap) has no bf16 rows to read: the embedding keeps the
        # exact weights it had, the head its packed copy, and each is stored.
        why = (
            f"lm_head is {head.storage}, a lookup needs dense-bf16"
            if head.storage != "dense-bf16"
            else "its lookup is not a plain one"
        )
        w = getattr(emb, "weight", None)
        kept = (
            f"{str(w.dtype).removeprefix('torch.')}, {w.numel() * w.element_size() / 1e6:.1f} MB"
            if isinstance(w, torch.Tensor)
            else "as it is"
        )
        log.info(
            "the packed lm_head and the tied %s input embedding keep separate copies (%s); "
            "the embedding stays %s",
            type(emb).__name__,
            why,
            kept,
        )
        untie_config(model)
        return False
    model.set_input_embeddings(packed)
    untie_config(model)
    return True


EXPORT_HINT = (
    "save the packed model with sparamx.save(model, tokenizer, DIR); for a standard "
    "Hugging Face checkpoint (pruned weights densified) run `sparamx export ARTIFACT OUT`"
)


class PackedModelError(RuntimeError):
    """A transformers method that cannot work on a model whose linears are packed."""


def guard_hf_methods(model: nn.Module) -> None:
    """Replace, on this model instance, the transformers methods that would silently do
    the wrong thing with packed layers by ones that fail with a clear message:
    ``save_pretrained`` (it would write ``values``/``bitmap`` tensors that
    ``from_pretrained`` cannot read) and ``resize_token_embeddings`` (when the embedding
    or the head is packed: it would allocate a fresh ``nn.Embedding`` and lose the
    shared packed copy)."""
    if not hasattr(model, "save_pretrained"):
        return
    name = type(model).__name__

    def save_pretrained(*args, **kwargs):
        raise PackedModelError(
            f"{name}.save_pretrained: this model's linears are packed (sparamx "
            f"SparseLinear), which transformers cannot save or reload; {EXPORT_HINT}"
        )

    base_resize = model.resize_token_embeddings

    def resize_token_embeddings(new_num_tokens=None, *args, **kwargs):
        packed = isinstance(model.get_input_embeddings(), PackedEmbedding) or isinstance(
            model.get_output_embeddings(), SparseLinear
        )
        if new_num_tokens is None or not packed:
            return base_resize(new_num_tokens, *args, **kwargs)
        raise PackedModelError(
            f"{name}.resize_token_embeddings: the embedding or lm_head is packed and cannot "
            "be resized; resize the source model before pruning and packing, or "
            f"{EXPORT_HINT} and resize that"
        )

    # Plain attributes on the instance shadow the class's methods.
    model.save_pretrained = save_pretrained
    model.resize_token_embeddings = resize_token_embeddings


def untie_config(model: nn.Module) -> None:
    """The packed head and embedding already share one tensor; stop transformers'
    ``tie_weights`` (called by lm-eval, ``generate`` set-up...) from looking for an
    ``embed_tokens.weight`` parameter that no longer exists."""
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def linear_names(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by ``include`` / ``exclude`` patterns
    (exact name, dotted suffix, glob or ``re:`` regex, as in pruning; see
    :mod:`sparamx.select`). ``include`` default: all; ``exclude`` default: ``lm_head``."""
    include = check_patterns(include or ["*"], "include")
    exclude = check_patterns(["lm_head"] if exclude is None else exclude, "exclude")
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for p in unmatched(include, linears):
        log.warning("include pattern %r matches no linear of %s", p, type(model).__name__)
    return [name for name in linears if is_selected(name, include, exclude)]


def swap_linears(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    storage: str = "auto",
    masks: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Replace the selected ``nn.Linear`` modules of ``model`` with ``SparseLinear`` in
    place (``lm_head`` is excluded unless asked). Returns the swapped names."""
    names = linear_names(model, include, exclude)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        mask = masks.get(name) if masks else None
        setattr(parent, child, SparseLinear.from_linear(linear, mask, storage=storage))
    if share_tied_embedding(model):
        log.info("input embedding now reads the tied lm_head's packed weight")
    guard_hf_methods(model)
    log.info("swapped %d linears for SparseLinear", len(names))
    return names
