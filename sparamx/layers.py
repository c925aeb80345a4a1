"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is packed (bitmap-bf16 or
dense-bf16) and multiplied by the native kernels, and the helper that swaps the linears
of a transformers model."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from . import ops as _ops  # noqa: F401  (loads the native ops: torch.ops.sparamx.*)
from .format import PackedWeight, pack

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


def linear_names(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by glob patterns (``include`` default:
    all; ``exclude`` default: ``lm_head``)."""
    include = include or ["*"]
    exclude = ["lm_head"] if exclude is None else exclude
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        ):
            names.append(name)
    return names


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
    log.info("swapped %d linears for SparseLinear", len(names))
    return names
