"""SparseGPT (Frantar and Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot") for one linear weight ``W[N, K]``.

The layer-wise loss ||X W^T - X W_s^T||^2 has Hessian H = X^T X (``K x K``, summed over
calibration tokens). Columns are visited left to right in blocks: in each block the mask
is chosen by the optimal-brain-surgeon saliency w^2 / [H^-1]_jj^2, and every pruned
weight's error is spread over the columns to its right through the upper Cholesky
factor of H^-1. Per-row (or per-matrix) zero counts are exact, as in
:func:`pruning.scores.mask_from_scores`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .scores import check_sparsity, drop_lowest, prune_count

log = logging.getLogger(__name__)

PERCDAMP = 0.01  # damping added to diag(H), as a fraction of its mean (the paper's value)
BLOCK_SIZE = 128  # columns per lazy-update block (the paper's value)
DAMP_RETRIES = 3  # each retry multiplies the damping by 10 before giving up


class SingularHessianError(ValueError):
    """H + damping is not positive definite (non-finite inputs or no damping)."""


@contextlib.contextmanager
def input_hessians(linears: dict[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, accumulate H = sum over tokens of x x^T for each linear's input.

    Each batch's product is an fp32 matmul; the running sums are fp64 so that many
    batches add without loss. Linears fed the same tensor (q/k/v, gate/up) share one
    product per batch instead of recomputing it.
    """
    hs = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for n, m in linears.items()
    }
    last: list = [None, None]  # (input tensor, its x^T x): the most recent product

    def hook(name: str):
        def pre_hook(module, args):
            x = args[0]
            if last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                last[0], last[1] = x, flat.T @ flat
            hs[name] += last[1].to(hs[name].device)

        return pre_hook

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        yield hs
    finally:
        for h in handles:
            h.remove()
        last.clear()


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float = PERCDAMP, name: str = "linear"
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (fp64), with damp = percdamp * mean diag.

    If H + damp I is not positive definite (fp error on a near-singular H), the damping
    is raised tenfold up to ``DAMP_RETRIES`` times; after that, or at once when H is not
    finite, :class:`SingularHessianError` names the layer.
    """
    if not torch.isfinite(hessian).all():
        raise SingularHessianError(
            f"{name}: the Hessian X^T X has non-finite entries (inf/nan calibration inputs)"
        )
    h = hessian.to(torch.float64)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean())
    frac = percdamp
    for attempt in range(DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h + frac * mean_diag * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        if attempt < DAMP_RETRIES and frac > 0:
            log.warning(
                "%s: H + %.3g x mean diag is not positive definite; retrying with %.3g",
                name,
                frac,
                frac * 10,
            )
            frac *= 10
        else:
            break
    raise SingularHessianError(
        f"{name}: the Hessian X^T X is not positive definite even with damping "
        f"{frac:.3g} x its mean diagonal (percdamp={percdamp}); give more calibration "
        f"tokens than the layer has inputs ({h.shape[0]}) or a larger percdamp"
    )


def block_drop_counts(sparsity: float, rows: int, cols: int, block: int, granularity: str):
    """Zeros to choose in each column block: per row (``row``) or in the whole block
    (``layer``), from cumulative counts so that they sum to the exact total."""
    per = 1 if granularity == "row" else rows
    edges = list(range(0, cols, block)) + [cols]
    return [
        prune_count(sparsity, per * b) - prune_count(sparsity, per * a)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    granularity: str = "row",
    *,
    percdamp: float = PERCDAMP,
    block_size: int = BLOCK_SIZE,
    name: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated weight in ``weight``'s dtype, keep-mask) for ``W[N, K]`` and
    its input Hessian ``H[K, K]``. ``weight`` is not modified."""
    check_sparsity(sparsity)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: Hessian has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    w = w.clone()
    h = hessian.to(torch.float64).clone()
    # Inputs that are zero on every calibration token: their weights cannot change the
    # calibration output, so they go first (saliency 0) and H gets a unit diagonal there.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, percdamp, name).to(w.dtype)
    del h
    keep = torch.ones(n, k, dtype=torch.bool, device=w.device)
    counts = block_drop_counts(sparsity, n, k, block_size, granularity)
    for b, drop in enumerate(counts):
        i1, i2 = b * block_size, min((b + 1) * block_size, k)
        keep[:, i1:i2] = _prune_block(w, u, i1, i2, drop, granularity)
    w.masked_fill_(~keep, 0.0)  # exact zeros whatever the rounding of the updates
    return w.to(weight.dtype), keep


def _prune_block(
    w: torch.Tensor, u: torch.Tensor, i1: int, i2: int, drop: int, granularity: str
) -> torch.Tensor:
    """Choose the block's mask, prune its columns one by one with OBS updates inside the
    block, then apply the block's accumulated error to all later columns (in place)."""
    blk = w[:, i1:i2].clone()
    ub = u[i1:i2, i1:i2]
    d = ub.diagonal()
    saliency = blk.pow(2) / d.pow(2)[None, :]
    if granularity == "row":
        keep = drop_lowest(saliency, drop)
    else:
        keep = drop_lowest(saliency.reshape(1, -1), drop).reshape(blk.shape)
    err = torch.zeros_like(blk)
    for j in range(i2 - i1):
        col = blk[:, j]
        q = col * keep[:, j]
        e = (col - q) / d[j]
        blk[:, j + 1 :] -= e[:, None] * ub[j, j + 1 :][None, :]
        blk[:, j] = q
        err[:, j] = e
    w[:, i1:i2] = blk
    w[:, i2:] -= err @ u[i1:i2, i2:]
    return keep
