"""Pruning scores for a linear weight ``W[N, K]`` (out x in) and the mask they imply.

A method is a score function: a larger score means "keep". The mask drops the lowest
scores with an exact count per comparison group, so the target sparsity is met exactly:
``floor(s * K)`` zeros in every output row (``granularity="row"``, the Wanda default) or
``floor(s * N * K)`` in the whole matrix (``"layer"``).
"""

from __future__ import annotations

import math

import torch

GRANULARITIES = ("row", "layer")
RIA_POWER = 0.5  # exponent of the activation norm in RIA (the paper's a)


def check_sparsity(sparsity: float) -> float:
    """Sparsity must lie in [0, 1): 1 would delete a whole layer."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _score_dtype(weight: torch.Tensor) -> torch.dtype:
    # bf16 has 8 mantissa bits: ranking in it would create ties by the thousand.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|."""
    return weight.detach().to(_score_dtype(weight)).abs()


def wanda_score(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with ``input_sq_norm[j] = sum over calibration tokens of X_j^2``
    (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs", eq. 1)."""
    _check_norm(weight, input_sq_norm)
    dtype = _score_dtype(weight)
    return weight.detach().to(dtype).abs() * input_sq_norm.to(dtype).sqrt()[None, :]


def _check_norm(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> None:
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"input norm has shape {tuple(input_sq_norm.shape)}, expected "
            f"({weight.shape[1]},) for a weight of shape {tuple(weight.shape)}"
        )


def ria_score(
    weight: torch.Tensor, input_sq_norm: torch.Tensor, power: float = RIA_POWER
) -> torch.Tensor:
    """Relative importance and activations (Zhang et al., 2024, "Plug-and-Play: An
    Efficient Post-training Pruning Method for LLMs"): ``(|W_ij| / sum_k |W_ik| +
    |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** power``. A weight counts relative to both the
    output row and the input column it connects, so no row or column is pruned away."""
    _check_norm(weight, input_sq_norm)
    dtype = _score_dtype(weight)
    a = weight.detach().to(dtype).abs()
    # Tiny floor: an all-zero row or column has relative importance 0, not nan.
    tiny = torch.finfo(dtype).tiny
    rel = a / a.sum(1, keepdim=True).clamp_min(tiny) + a / a.sum(0, keepdim=True).clamp_min(tiny)
    return rel * input_sq_norm.to(dtype).sqrt().pow(power)[None, :]


def prune_count(sparsity: float, size: int) -> int:
    """Elements to zero in a group of ``size``: floor(s * size), robust to float error
    (0.3 * 10 is 2.9999999999999996 in binary floating point, but means 3)."""
    return min(size, math.floor(sparsity * size + 1e-9))


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, granularity: str = "row"
) -> torch.Tensor:
    """Boolean keep-mask of ``scores``' shape with the lowest scores dropped.

    Ties are broken deterministically: among equal scores the lower index (row-major within
    the group) is dropped first, via a stable sort.
    """
    check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    groups = scores if granularity == "row" else scores.reshape(1, -1)
    return drop_lowest(groups, prune_count(sparsity, groups.shape[1])).reshape(scores.shape)


def drop_lowest(groups: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``groups`` [R, C] without the k lowest scores of each row, ties broken
    by lower index first."""
    keep = torch.ones_like(groups, dtype=torch.bool)
    if k and groups.dtype == torch.float32 and not groups.isnan().any():
        # Same result as the stable sort below, 2-3x faster at 8B shapes (a selection,
        # not a sort): each score becomes a unique int64 key, its float order in the
        # high bits and its index in the low bits, and the k smallest keys are dropped.
        keep = _drop_smallest_keys(groups, k)
    elif k:
        order = torch.sort(groups, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, order, False)
    return keep


def _drop_smallest_keys(groups: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of float32 ``groups`` [R, C] without the k smallest per row, ties broken
    by lower index first (what a stable sort does)."""
    # +0.0 turns -0.0 into +0.0 (equal as floats, different as bits). Then the IEEE bit
    # pattern read as int32 orders like the float once the magnitude bits of negative
    # values are flipped.
    bits = (groups + 0.0).view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    cols = groups.shape[1]
    key = bits.to(torch.int64) * cols + torch.arange(cols, dtype=torch.int64)
    kth = torch.kthvalue(key, k, dim=1, keepdim=True).values
    return key > kth
