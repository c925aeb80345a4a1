"""OWL, outlier-weighted layerwise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Each decoder layer's outlier ratio is the share of its Wanda scores |W_ij| * ||X_j||
above ``m`` times the layer's mean score, measured on the dense model. Layers with more
outliers keep more weights: a layer's sparsity is the target minus a deviation
proportional to how far its ratio lies from the (parameter-weighted) mean ratio, scaled so
that the largest deviation is ``lam``. The parameter-weighted mean of the layer
sparsities is then the target, so the model's overall sparsity is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class OWL:
    lam: float = 0.08  # largest deviation of a layer's sparsity from the target (paper)
    m: float = 5.0  # outlier threshold, in multiples of the layer's mean score (paper)

    def __post_init__(self):
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"owl lambda must be in [0, 1), got {self.lam!r}")
        if not self.m > 0:
            raise ValueError(f"owl m must be > 0, got {self.m!r}")


def resolve_allocation(allocation: str | OWL | None) -> OWL | None:
    """None for a uniform allocation, the OWL settings otherwise ("owl": the defaults)."""
    if isinstance(allocation, OWL):
        return allocation
    if allocation in (None, "uniform"):
        return None
    if allocation == "owl":
        return OWL()
    raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (one layer's score matrices) above m x their mean."""
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(
    ratios: Sequence[float], numels: Sequence[int], target: float, lam: float
) -> list[float]:
    """Per-layer sparsities within ``target`` +/- ``lam`` whose mean weighted by
    ``numels`` (prunable weights per layer) is ``target``. Layers with nothing to prune
    get the target and do not count."""
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(numels, dtype=torch.float64)
    if n.sum() == 0:
        return [target] * len(ratios)
    centred = r - (r * n).sum() / n.sum()
    spread = centred[n > 0].abs().max() if (n > 0).any() else torch.tensor(0.0)
    if spread < 1e-12:  # equal ratios up to rounding (ratios are shares in [0, 1])
        return [target] * len(ratios)
    out = torch.where(n > 0, target - lam * centred / spread, torch.tensor(target))
    if out.min() < 0 or out.max() >= 1:
        raise ValueError(
            f"owl: target sparsity {target} +/- lambda {lam} leaves [0, 1) "
            f"(layer sparsities {out.min():.3f} .. {out.max():.3f}); use a smaller lambda"
        )
    return out.tolist()
