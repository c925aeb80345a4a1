"""Unstructured pruning of a transformers causal LM's linear weights: magnitude, Wanda,
RIA and SparseGPT, with a uniform or an OWL (outlier-weighted) allocation over layers.

    from pruning import prune
    result = prune(model, "wanda", 0.5, tokenizer=tokenizer)   # weights masked in place
    result = prune(model, "sparsegpt", 0.7, tokenizer=tokenizer, allocation="owl")
    print(result.table())

See :mod:`pruning.layerwise` for the one-layer entry point used by streaming callers.
"""

from .calibration import C4_PAPER, Calibration, load_calibration, strip_wikitext
from .driver import PruneResult, format_table, prune
from .layerwise import (
    DEFAULT_SKIP,
    METHODS,
    LayerInputs,
    capture_layer_inputs,
    decoder_layers,
    prune_decoder_layer,
)
from .owl import ALLOCATIONS, OWL, owl_sparsities
from .scores import magnitude_score, mask_from_scores, ria_score, wanda_score
from .sparsegpt import SingularHessianError, sparsegpt_prune

__all__ = [
    "ALLOCATIONS",
    "C4_PAPER",
    "DEFAULT_SKIP",
    "METHODS",
    "OWL",
    "Calibration",
    "LayerInputs",
    "PruneResult",
    "capture_layer_inputs",
    "decoder_layers",
    "format_table",
    "load_calibration",
    "magnitude_score",
    "mask_from_scores",
    "prune",
    "owl_sparsities",
    "prune_decoder_layer",
    "ria_score",
    "SingularHessianError",
    "sparsegpt_prune",
    "strip_wikitext",
    "wanda_score",
]
