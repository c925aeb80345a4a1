"""Load any model source the CLI accepts: a packed sparamx artifact or a dense model.

A directory holding ``sparamx.json`` is a packed artifact and goes through
``sparamx.load``; everything else (HF directory, ``.gguf`` file, ``smollm2-135m``, hub
id) goes through ``sparamx.models.load_model``. Every failure becomes a
``ModelLoadError`` naming the path.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ARTIFACT_MANIFEST = "sparamx.json"


class ModelLoadError(RuntimeError):
    """The model path could not be loaded (missing, unreadable, or not a model)."""


def is_artifact(source: str | os.PathLike) -> bool:
    return (Path(source).expanduser() / ARTIFACT_MANIFEST).is_file()


def load_artifact(path: Path, dtype: str):
    import sparamx

    try:
        # sparamx resolves ``load`` lazily (it imports the artifact module and may need
        # the native extension), so a missing piece shows up as an ImportError too.
        load = sparamx.load
    except (AttributeError, ImportError) as e:
        raise ModelLoadError(
            f"{path} is a packed sparamx artifact ({ARTIFACT_MANIFEST}), but sparamx.load "
            f"is not available in this sparamx: {e}"
        ) from e
    # Packed weights are bf16; pass the dtype only if sparamx.load takes one.
    kwargs = {"dtype": dtype} if "dtype" in inspect.signature(load).parameters else {}
    if not kwargs:
        log.info("sparamx.load takes no dtype; %s ignored for %s", dtype, path)
    try:
        return load(path, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not load packed artifact {path}: {e}") from e


def load_for_eval(source: str | os.PathLike, dtype: str = "bfloat16"):
    """``(model, tokenizer)`` from an artifact dir, HF dir, GGUF file, built-in or hub id."""
    from sparamx.models import load_model

    if is_artifact(source):
        return load_artifact(Path(source).expanduser(), dtype)
    try:
        return load_model(source, dtype)
    except Exception as e:
        raise ModelLoadError(f"could not load model {str(source)!r}: {e}") from e
