"""Unstructured pruning of a transformers causal LM's linear weights (magnitude, Wanda).

    from pruning import prune
    result = prune(model, "wanda", 0.5, tokenizer=tokenizer)   # weights masked in place
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
from .scores import magnitude_score, mask_from_scores, wanda_score

__all__ = [
    "C4_PAPER",
    "DEFAULT_SKIP",
    "METHODS",
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
    "prune_decoder_layer",
    "strip_wikitext",
    "wanda_score",
]
