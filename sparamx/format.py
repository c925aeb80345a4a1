"""The packed weight formats (bitmap-bf16, dense-bf16 and their int8 variants): pure-PyTorch
pack, unpack, validation and reference matmul.

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

The int8 layouts (``bitmap-int8``, ``dense-int8``) keep the same units, bitmap and
offsets with int8 ``values`` (symmetric, round to nearest, ``|q| <= 127``; the sparse
values end in ``VALUES_PAD_INT8`` zeros) plus ``scales``, float32 ``[G, KB, 16]``: one
per output row and block of ``QBLOCK`` input columns (``KB = ceil(Kp / QBLOCK)``),
``scale = max|w| / 127`` over the block's row (0 for an all-zero block), and
``W[16g+c, k] = q * scales[g, k // QBLOCK, c]``. Why fp32 scales per 128 columns: see
``csrc/kernels.h``. Bytes per weight: ``1/8 + (1-s) + 4/128`` (0.66 at s = 0.5, 0.46 at
s = 0.7) against ``1/8 + 2(1-s)`` for bitmap-bf16 (1.13, 0.73).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Artifact format version: 2 added the int8 storages (version-1 artifacts still load).
FORMAT_VERSION = 2
GROUP = 16  # output features per column group
K_ALIGN = 32  # K padded to this (one AMX tile of K)
UNIT = 32  # bf16 per unit
VALUES_PAD = 32  # zeros after the last value: a 64-byte load of the last unit stays in bounds
QBLOCK = 128  # input columns per int8 scale block (64 K-pairs)
VALUES_PAD_INT8 = 64  # zero int8 after the last value: a 64-byte load stays in bounds
BF16_STORAGES = ("bitmap-bf16", "dense-bf16")
INT8_STORAGES = ("bitmap-int8", "dense-int8")
STORAGES = (*BF16_STORAGES, *INT8_STORAGES)
DENSE_STORAGES = ("dense-bf16", "dense-int8")
# What ``pack`` may be asked for besides a storage: a choice per weight, the bitmap at
# ``min_sparsity`` and above, the dense layout below it, within one value type.
AUTO_STORAGES = {"auto": ("bitmap-bf16", "dense-bf16"), "auto-int8": ("bitmap-int8", "dense-int8")}
PACK_STORAGES = (*AUTO_STORAGES, *STORAGES)

_BYTE_BITS = torch.arange(8, dtype=torch.uint8)


class PackedWeightError(ValueError):
    """A PackedWeight whose tensors are inconsistent (corrupt or tampered)."""


def padded_shape(n: int, k: int) -> tuple[int, int]:
    return -(-n // GROUP) * GROUP, -(-k // K_ALIGN) * K_ALIGN


def k_blocks(k: int) -> int:
    """Int8 scale blocks per row for K input columns."""
    return -(-padded_shape(1, k)[1] // QBLOCK)


def _to_units(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [G, P, 32] in VNNI unit order (zero-padded)."""
    n, k = weight.shape
    np_, kp = padded_shape(n, k)
    w = torch.zeros(np_, kp, dtype=weight.dtype)
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
    groups, pairs = np_ // GROUP, kp // 2
    if storage == "dense-bf16":
        return np_ * kp * 2
    if storage in INT8_STORAGES:
        scales = np_ * k_blocks(k) * 4
        if storage == "dense-int8":
            return np_ * kp + scales
        return groups * pairs * 4 + nnz + VALUES_PAD_INT8 + (groups + 1) * 8 + scales
    return groups * pairs * 4 + (nnz + VALUES_PAD) * 2 + (groups + 1) * 8


@dataclass(frozen=True)
class PackedWeight:
    """A weight in one of :data:`STORAGES`. Build with :func:`pack`."""

    shape: tuple[int, int]  # (N, K) of the original weight
    storage: str  # one of STORAGES
    values: torch.Tensor  # bf16 (or int8 for the int8 storages), 1-D
    bitmap: torch.Tensor | None = None  # int32 [G, P] (sparse only)
    offsets: torch.Tensor | None = None  # int64 [G+1] (sparse only)
    scales: torch.Tensor | None = None  # float32 [G, KB, 16] (int8 only)

    def __post_init__(self):
        self.validate()

    @property
    def nnz(self) -> int:
        if self.storage in DENSE_STORAGES:
            return int(torch.count_nonzero(self.values))
        return int(self.offsets[-1])

    @property
    def sparsity(self) -> float:
        n, k = self.shape
        return 1.0 - self.nnz / (n * k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def is_int8(self) -> bool:
        return self.storage in INT8_STORAGES

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (artifact keys ``<name>.<key>``)."""
        out = {"values": self.values}
        if self.storage not in DENSE_STORAGES:
            out = {"bitmap": self.bitmap, "values": self.values, "offsets": self.offsets}
        if self.is_int8:
            out["scales"] = self.scales
        return out

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
        vdtype, vname = (torch.int8, "int8") if self.is_int8 else (torch.bfloat16, "bf16")
        if not isinstance(v, torch.Tensor) or v.dtype != vdtype or v.dim() != 1:
            raise PackedWeightError(
                f"{self.storage} values must be a 1-D {vname} CPU tensor, got "
                f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}"
            )
        if v.device.type != "cpu":
            raise PackedWeightError(f"values must be on the CPU, got {v.device}")
        if self.is_int8:
            self._validate_int8(groups, k)
        elif self.scales is not None:
            raise PackedWeightError(f"{self.storage} storage has no scales")
        if self.storage in DENSE_STORAGES:
            if v.numel() != groups * pairs * UNIT:
                raise PackedWeightError(
                    f"dense values hold {v.numel()} {vname}, expected {groups * pairs * UNIT} "
                    f"for shape {self.shape}"
                )
            if self.bitmap is not None or self.offsets is not None:
                raise PackedWeightError(f"{self.storage} storage has no bitmap or offsets")
            return
        b, o = self.bitmap, self.offsets
        if b is None or o is None:
            raise PackedWeightError(f"{self.storage} storage needs bitmap and offsets")
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
        pad = VALUES_PAD_INT8 if self.is_int8 else VALUES_PAD
        if v.numel() != int(o[-1]) + pad:
            raise PackedWeightError(
                f"values hold {v.numel()} {vname}, expected nnz + pad = {int(o[-1])} + {pad}"
            )
        # Padding in the dense layout is zero by construction; a bitmap bit set in the
        # padded rows or columns would make unpack() disagree with the kernels.
        if np_ > n or kp > k:
            pad = _from_units(mask.to(torch.bfloat16), np_, kp).bool()
            if pad[n:].any() or pad[:, k:].any():
                raise PackedWeightError("bitmap marks values in the zero padding")

    def _validate_int8(self, groups: int, k: int) -> None:
        s, v = self.scales, self.values
        kb = k_blocks(k)
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise PackedWeightError(
                f"{self.storage} storage needs float32 scales [{groups}, {kb}, {GROUP}], got "
                f"{getattr(s, 'dtype', type(s).__name__)}"
            )
        if tuple(s.shape) != (groups, kb, GROUP) or s.device.type != "cpu":
            raise PackedWeightError(
                f"scales must be a float32 CPU tensor [{groups}, {kb}, {GROUP}] for shape "
                f"{self.shape}, got {tuple(s.shape)} on {s.device}"
            )
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise PackedWeightError("scales must be finite and non-negative")
        if v.numel() and int(v.min()) < -127:
            raise PackedWeightError("int8 values must lie in [-127, 127] (symmetric), got -128")

    def unpack(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight [N, K] in ``dtype``: exact for the bf16 storages; for int8 the
        dequantized ``q * scale``, computed in fp32 (then cast to ``dtype``)."""
        n, k = self.shape
        np_, kp = padded_shape(n, k)
        groups, pairs = np_ // GROUP, kp // 2
        if self.storage in DENSE_STORAGES:
            units = self.values.view(groups, pairs, UNIT)
        else:
            units = torch.zeros(groups, pairs, UNIT, dtype=self.values.dtype)
            units[bitmap_to_mask(self.bitmap)] = self.values[: int(self.offsets[-1])]
        if not self.is_int8:
            return _from_units(units, n, k).to(dtype)
        q = _from_units(units, n, k).float()
        return (q * self.weight_scales()).to(dtype)

    def weight_scales(self) -> torch.Tensor:
        """float32 [N, K]: the scale of every weight (int8 storages: one quantization step)."""
        if not self.is_int8:
            raise ValueError(f"{self.storage} storage has no scales")
        n, k = self.shape
        np_ = padded_shape(n, k)[0]
        s = self.scales.permute(0, 2, 1).reshape(np_, -1)  # [Np, KB]
        return s.repeat_interleave(QBLOCK, dim=1)[:n, :k].contiguous()

    def kept(self) -> torch.Tensor:
        """bool [N, K]: the entries a bitmap keeps (also an int8 value that rounded to 0);
        for the dense storages, the non-zeros."""
        n, k = self.shape
        if self.storage in DENSE_STORAGES:
            return self.unpack(torch.float32) != 0
        return _from_units(bitmap_to_mask(self.bitmap), *padded_shape(n, k))[:n, :k].contiguous()


def pack(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    storage: str = "auto",
    min_sparsity: float = 0.05,
) -> PackedWeight:
    """Pack a 2-D weight. ``mask`` (bool, same shape) selects kept entries; without it
    the non-zeros are kept. ``storage="auto"`` (``"auto-int8"``) keeps weights less
    sparse than ``min_sparsity`` in the dense-bf16 (dense-int8) layout, where a bitmap
    would cost more bytes, and the others in bitmap-bf16 (bitmap-int8)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"pack expects a 2-D weight tensor, got {getattr(weight, 'shape', weight)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"pack expects a floating-point weight, got {weight.dtype}")
    if storage not in PACK_STORAGES:
        raise ValueError(f"storage {storage!r} is not one of {', '.join(PACK_STORAGES)}")
    n, k = weight.shape
    if n < 1 or k < 1:
        raise ValueError(f"pack expects a non-empty weight, got shape {tuple(weight.shape)}")
    # int8 quantizes from the weight as given (fp32), bf16 stores it rounded to bf16.
    int8 = storage in (*INT8_STORAGES, "auto-int8")
    w = weight.detach().to("cpu", torch.float32 if int8 else torch.bfloat16)
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {(n, k)}")
        w = torch.where(mask.to("cpu", torch.bool), w, torch.zeros((), dtype=w.dtype))
    if storage in AUTO_STORAGES:
        sparsity = 1.0 - int(torch.count_nonzero(w)) / (n * k)
        bitmap, dense = AUTO_STORAGES[storage]
        storage = bitmap if sparsity >= min_sparsity else dense
    if int8:
        if not bool(torch.isfinite(w).all()):
            raise ValueError("pack: an int8 storage needs a finite weight (it has inf or NaN)")
        return _pack_int8(w, storage)
    units = _to_units(w)  # [G, P, 32]
    keep = units != 0
    if storage == "dense-bf16":
        return PackedWeight((n, k), storage, units.reshape(-1).contiguous())
    bitmap = mask_to_bitmap(keep)
    values = torch.cat([units[keep], torch.zeros(VALUES_PAD, dtype=torch.bfloat16)])
    offsets = torch.zeros(units.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.count_nonzero(keep.view(keep.shape[0], -1), dim=1).cumsum(0)
    return PackedWeight((n, k), storage, values, bitmap.contiguous(), offsets)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a float [N, K] weight per row and block of ``QBLOCK`` columns:
    (q int8 [Np, Kp] zero-padded, scales float32 [Np, KB]). ``scale = max|w| / 127``
    (0 for an all-zero block), ``q = round(w / scale)`` (to nearest, ties to even)."""
    n, k = weight.shape
    np_, kp = padded_shape(n, k)
    kb = k_blocks(k)
    w = torch.zeros(np_, kb * QBLOCK, dtype=torch.float32)
    w[:n, :k] = weight
    blocks = w.view(np_, kb, QBLOCK)
    scales = blocks.abs().amax(-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones((), dtype=torch.float32))
    q = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.view(np_, -1)[:, :kp].contiguous(), scales


def _pack_int8(w: torch.Tensor, storage: str) -> PackedWeight:
    n, k = w.shape
    q, scales = quantize(w)
    units = _to_units(q)  # [G, P, 32] int8 (padding already zero)
    keep = _to_units(w) != 0  # the weight's non-zeros, even those whose q rounds to 0
    g = units.shape[0]
    s = scales.view(g, GROUP, -1).permute(0, 2, 1).contiguous()  # [G, KB, 16]
    if storage == "dense-int8":
        return PackedWeight((n, k), storage, units.reshape(-1).contiguous(), scales=s)
    values = torch.cat([units[keep], torch.zeros(VALUES_PAD_INT8, dtype=torch.int8)])
    offsets = torch.zeros(g + 1, dtype=torch.int64)
    offsets[1:] = torch.count_nonzero(keep.view(g, -1), dim=1).cumsum(0)
    return PackedWeight((n, k), storage, values, mask_to_bitmap(keep), offsets, s)


def reference_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What every kernel computes: bf16 inputs, the weight (bf16, or int8 dequantized in
    fp32), fp32 accumulation, output in x's dtype. (The AMX int8 prefill, M > 4,
    multiplies bf16(q * scale): each weight rounded once more, a relative 2^-9 at most.)"""
    w = packed.unpack(torch.float32)
    y = x.to(torch.bfloat16).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
