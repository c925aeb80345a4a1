"""The bitmap-bf16 packed weight format (version 1): pure-PyTorch pack, unpack,
validation and reference matmul.

Layout (see ``csrc/kernels.h`` for the same text next to the kernels): a weight
``W[N, K]`` is zero-padded to ``Np = ceil(N/16)*16`` rows and ``Kp = ceil(K/32)*32``
columns; unit ``(g, p)`` holds the 32 bf16 ``W[16g+c, 2p+j]`` at position ``2c+j``
(VNNI order: one AMX B-tile row, one ``vdpbf16ps`` operand).

- ``bitmap``  int32 ``[G, P]`` (uint32 bit patterns): bit ``2c+j`` set iff kept;
- ``values``  bf16, kept values unit by unit in bit order, then ``VALUES_PAD`` zeros;
- ``offsets`` int64 ``[G+1]``: start of each column group in ``values``.

The *dense* layout stores every unit whole (``values`` is ``[G*P*32]``, no bitmap): it
is cheaper than a bitmap below about 5% sparsity (64 bytes per unit vs
``4 + 2*nnz``), so ``pack`` chooses per weight (``storage="auto"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
GROUP = 16  # output features per column group
K_ALIGN = 32  # K padded to this (one AMX tile of K)
UNIT = 32  # bf16 per unit
VALUES_PAD = 32  # zeros after the last value: a 64-byte load of the last unit stays in bounds
STORAGES = ("bitmap-bf16", "dense-bf16")

_BYTE_BITS = torch.arange(8, dtype=torch.uint8)


class PackedWeightError(ValueError):
    """A PackedWeight whose tensors are inconsistent (corrupt or tampered)."""


def padded_shape(n: int, k: int) -> tuple[int, int]:
    return -(-n // GROUP) * GROUP, -(-k // K_ALIGN) * K_ALIGN


def _to_units(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [G, P, 32] in VNNI unit order (zero-padded)."""
    n, k = weight.shape
    np_, kp = padded_shape(n, k)
    w = torch.zeros(np_, kp, dtype=torch.bfloat16)
    w[:n, :k] = weight
    # [G, 16 (c), P, 2 (j)] -> [G, P, 16, 2] -> [G, P, 32]
    return (
        w.view(np_ // GROUP, GROUP, kp // 2, 2)
        .permute(0, 2, 1, 3)
        .reshape(np_ // GROUP, kp // 2, UNIT)
    )


def _from_units(units: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[G, P, 32] -> [N, K] (drops the padding)."""
    g, p, _ = units.shape
    w = units.view(g, p, GROUP, 2).permute(0, 2, 1, 3).reshape(g * GROUP, p * 2)
    return w[:n, :k].contiguous()


def bitmap_to_mask(bitmap: torch.Tensor) -> torch.Tensor:
    """int32 [G, P] bitmap -> bool [G, P, 32] keep mask."""
    # Byte-wise on the little-endian bytes of each word (bit 8b+i of the word is bit i of
    # byte b): uint8 temporaries instead of int64 ones, ~7x faster on 8B-sized layers.
    by = bitmap.contiguous().view(torch.uint8).view(*bitmap.shape, 4, 1)
    bits = (by >> _BYTE_BITS) & 1  # [G, P, 4, 8]
    return bits.view(torch.bool).reshape(*bitmap.shape, UNIT)


def mask_to_bitmap(keep: torch.Tensor) -> torch.Tensor:
    """bool [G, P, 32] keep mask -> int32 [G, P] bitmap (the inverse of bitmap_to_mask)."""
    g, p, _ = keep.shape
    bits = keep.contiguous().view(torch.uint8).view(g, p, 4, 8) << _BYTE_BITS
    # Distinct bits: the uint8 sum is their OR and cannot overflow.
    return bits.sum(-1, dtype=torch.uint8).view(torch.int32).reshape(g, p)


def bytes_for(n: int, k: int, nnz: int, storage: str) -> int:
    """Bytes a packed weight occupies (what the kernel streams per call)."""
    np_, kp = padded_shape(n, k)
    if storage == "dense-bf16":
        return np_ * kp * 2
    groups, pairs = np_ // GROUP, kp // 2
    return groups * pairs * 4 + (nnz + VALUES_PAD) * 2 + (groups + 1) * 8


@dataclass(frozen=True)
class PackedWeight:
    """A weight in bitmap-bf16 (sparse) or dense-bf16 layout. Build with :func:`pack`."""

    shape: tuple[int, int]  # (N, K) of the original weight
    storage: str  # "bitmap-bf16" or "dense-bf16"
    values: torch.Tensor  # bf16, 1-D
    bitmap: torch.Tensor | None = None  # int32 [G, P] (sparse only)
    offsets: torch.Tensor | None = None  # int64 [G+1] (sparse only)

    def __post_init__(self):
        self.validate()

    @property
    def nnz(self) -> int:
        if self.storage == "dense-bf16":
            return int(torch.count_nonzero(self.values))
        return int(self.offsets[-1])

    @property
    def sparsity(self) -> float:
        n, k = self.shape
        return 1.0 - self.nnz / (n * k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (artifact keys ``<name>.<key>``)."""
        if self.storage == "dense-bf16":
            return {"values": self.values}
        return {"bitmap": self.bitmap, "values": self.values, "offsets": self.offsets}

    def validate(self) -> None:
        """Check every invariant the kernels rely on; raise PackedWeightError if broken."""
        n, k = self.shape
        if n < 1 or k < 1:
            raise PackedWeightError(f"weight shape must be positive, got {self.shape}")
        if self.storage not in STORAGES:
            raise PackedWeightError(f"storage {self.storage!r} is not one of {STORAGES}")
        np_, kp = padded_shape(n, k)
        groups, pairs = np_ // GROUP, kp // 2
        v = self.values
        if v.dtype != torch.bfloat16 or v.dim() != 1 or v.device.type != "cpu":
            raise PackedWeightError(
                f"values must be a 1-D bfloat16 CPU tensor, got {v.dtype} {tuple(v.shape)}"
            )
        if self.storage == "dense-bf16":
            if v.numel() != groups * pairs * UNIT:
                raise PackedWeightError(
                    f"dense values hold {v.numel()} bf16, expected {groups * pairs * UNIT} "
                    f"for shape {self.shape}"
                )
            return
        b, o = self.bitmap, self.offsets
        if b is None or o is None:
            raise PackedWeightError("bitmap-bf16 storage needs bitmap and offsets")
        if b.dtype != torch.int32 or tuple(b.shape) != (groups, pairs):
            raise PackedWeightError(
                f"bitmap must be int32 [{groups}, {pairs}] for shape {self.shape}, "
                f"got {b.dtype} {tuple(b.shape)}"
            )
        if o.dtype != torch.int64 or tuple(o.shape) != (groups + 1,):
            raise PackedWeightError(
                f"offsets must be int64 [{groups + 1}], got {o.dtype} {tuple(o.shape)}"
            )
        mask = bitmap_to_mask(b)  # [G, P, 32], shared by the two checks below
        counts = torch.count_nonzero(mask.view(groups, -1), dim=1)
        expected = torch.zeros(groups + 1, dtype=torch.int64)
        expected[1:] = counts.cumsum(0)
        if not torch.equal(o, expected):
            bad = int((o != expected).nonzero()[0, 0])
            raise PackedWeightError(
                f"offsets inconsistent with bitmap popcounts at group {bad}: "
                f"offsets[{bad}]={int(o[bad])}, popcounts give {int(expected[bad])}"
            )
        if v.numel() != int(o[-1]) + VALUES_PAD:
            raise PackedWeightError(
                f"values hold {v.numel()} bf16, expected nnz + pad = {int(o[-1])} + {VALUES_PAD}"
            )
        # Padding in the dense layout is zero by construction; a bitmap bit set in the
        # padded rows or columns would make unpack() disagree with the kernels.
        if np_ > n or kp > k:
            pad = _from_units(mask.to(torch.bfloat16), np_, kp).bool()
            if pad[n:].any() or pad[:, k:].any():
                raise PackedWeightError("bitmap marks values in the zero padding")

    def unpack(self) -> torch.Tensor:
        """The dense bf16 weight [N, K] (exact)."""
        n, k = self.shape
        np_, kp = padded_shape(n, k)
        groups, pairs = np_ // GROUP, kp // 2
        if self.storage == "dense-bf16":
            return _from_units(self.values.view(groups, pairs, UNIT), n, k)
        units = torch.zeros(groups, pairs, UNIT, dtype=torch.bfloat16)
        units[bitmap_to_mask(self.bitmap)] = self.values[: int(self.offsets[-1])]
        return _from_units(units, n, k)


def pack(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    storage: str = "auto",
    min_sparsity: float = 0.05,
) -> PackedWeight:
    """Pack a 2-D weight. ``mask`` (bool, same shape) selects kept entries; without it
    the non-zeros are kept. ``storage="auto"`` keeps weights sparser than
    ``min_sparsity`` in the dense layout (the bitmap would cost more bytes)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"pack expects a 2-D weight tensor, got {getattr(weight, 'shape', weight)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"pack expects a floating-point weight, got {weight.dtype}")
    if storage not in (*STORAGES, "auto"):
        raise ValueError(f"storage {storage!r} is not one of {(*STORAGES, 'auto')}")
    n, k = weight.shape
    if n < 1 or k < 1:
        raise ValueError(f"pack expects a non-empty weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.bfloat16)
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {(n, k)}")
        w = torch.where(mask.to("cpu", torch.bool), w, torch.zeros((), dtype=torch.bfloat16))
    units = _to_units(w)  # [G, P, 32]
    keep = units != 0
    if storage == "auto":
        sparsity = 1.0 - int(keep.sum()) / (n * k)
        storage = "bitmap-bf16" if sparsity >= min_sparsity else "dense-bf16"
    if storage == "dense-bf16":
        return PackedWeight((n, k), storage, units.reshape(-1).contiguous())
    bitmap = mask_to_bitmap(keep)
    values = torch.cat([units[keep], torch.zeros(VALUES_PAD, dtype=torch.bfloat16)])
    offsets = torch.zeros(units.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.count_nonzero(keep.view(keep.shape[0], -1), dim=1).cumsum(0)
    return PackedWeight((n, k), storage, values, bitmap.contiguous(), offsets)


def reference_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What every kernel computes: bf16 inputs and weights, fp32 accumulation, output in
    x's dtype."""
    w = packed.unpack().float()
    y = x.to(torch.bfloat16).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
