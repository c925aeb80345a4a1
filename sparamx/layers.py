"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is packed (bitmap-bf16 or
dense-bf16) and multiplied by the native kernels, and the helper that swaps the linears
of a transformers model."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import ops as _ops  # noqa: F401  (loads the native ops: torch.ops.sparamx.*)
from .format import PackedWeight, pack
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
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

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
        if self.bitmap is None:
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


class DenseLinear(SparseLinear):
    """``SparseLinear`` in the dense VNNI layout (no bitmap): our own bf16 GEMV/GEMM for
    layers that stay dense, such as ``lm_head``; streams weights faster than torch's."""

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, storage: str = "dense-bf16"
    ) -> DenseLinear:
        if storage != "dense-bf16":
            raise ValueError(f"DenseLinear stores dense-bf16 only, got storage={storage!r}")
        return super().from_linear(linear, mask, storage="dense-bf16")


class PackedEmbedding(nn.Module):
    """Embedding lookup that reads its rows from a dense-layout ``SparseLinear`` (a tied
    ``lm_head``): the tied weight is stored once, in the kernels' VNNI layout.

    Row r of the weight lives in column group r // 16 at lane r % 16 of every unit."""

    def __init__(self, head: SparseLinear, padding_idx: int | None = None):
        super().__init__()
        if head.storage != "dense-bf16":
            raise ValueError(
                "PackedEmbedding needs a dense-bf16 head (a bitmap has no fixed row positions)"
            )
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        self.register_buffer("values", head.values)  # the same tensor: no second copy
        # Dtype of the rows it returns (the model's activations); None: the stored bf16.
        self.out_dtype: torch.dtype | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"PackedEmbedding expects integer ids, got {ids.dtype}")
        units = self.values.view(
            -1, self.values.numel() // (-(-self.num_embeddings // 16) * 32), 16, 2
        )  # [G, P, 16 lanes, 2]
        rows = units[ids // 16, :, ids % 16, :]  # [*ids.shape, P, 2]
        rows = rows.reshape(*ids.shape, -1)[..., : self.embedding_dim]
        return rows if self.out_dtype is None else rows.to(self.out_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, shares lm_head's VNNI layout"


def set_activation_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Run a packed model's other parts in ``dtype``: every floating parameter and
    buffer (norms, plain embeddings, biases, rotary frequencies) is cast, and a
    ``PackedEmbedding`` returns rows in ``dtype``; the packed weights stay bf16 (the
    kernels read bf16 and take bf16 or fp32 input, returning the input's dtype).

    float32 is the choice on CPUs without a bf16 dot product: the packed linears cost
    the same either way, and attention, norms and the residual stream then run on
    torch's fp32 paths instead of its slow bf16 emulation (a prefill's attention
    matmuls are bf16 GEMMs, ~6x slower than fp32 on a Zen 3)."""
    packed = {
        id(t)
        for m in model.modules()
        if isinstance(m, (SparseLinear, PackedEmbedding))
        for name, t in m.named_buffers(recurse=False)
        if name in ("values", "bitmap", "offsets")
    }
    cast: dict[int, torch.Tensor] = {}  # id(old) -> new: tied tensors stay one tensor

    def wanted(t: torch.Tensor | None) -> bool:
        return t is not None and t.is_floating_point() and id(t) not in packed and t.dtype != dtype

    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if wanted(p):
                if id(p) not in cast:
                    cast[id(p)] = nn.Parameter(p.detach().to(dtype), p.requires_grad)
                setattr(mod, name, cast[id(p)])
        for name, b in list(mod.named_buffers(recurse=False)):
            # Non-persistent buffers (rotary frequencies) are computed by transformers
            # in the precision it wants (fp32) and stay as they are.
            if wanted(b) and name not in mod._non_persistent_buffers_set:
                if id(b) not in cast:
                    cast[id(b)] = b.to(dtype)
                mod.register_buffer(name, cast[id(b)])
        if isinstance(mod, PackedEmbedding):
            mod.out_dtype = None if dtype == mod.values.dtype else dtype
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype  # what transformers reads for masks and caches


def share_tied_embedding(model: nn.Module) -> bool:
    """If ``lm_head`` is a dense-layout ``SparseLinear`` tied to a plain ``nn.Embedding``,
    make the input embedding read from it (one copy of the tied weight). Returns
    whether it did."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not (
        isinstance(head, SparseLinear)
        and head.storage == "dense-bf16"
        and type(emb) is nn.Embedding
        and getattr(model.config, "tie_word_embeddings", False)
        and tuple(emb.weight.shape) == (head.out_features, head.in_features)
    ):
        return False
    model.set_input_embeddings(PackedEmbedding(head, emb.padding_idx))
    untie_config(model)
    return True


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
    log.info("swapped %d linears for SparseLinear", len(names))
    return names
