"""sparamx: unstructured-sparse LLM decoding on CPUs (bitmap-packed bf16 weights,
AMX / AVX-512-BF16 / portable kernels).

The public API is ``__all__``. The names that need the native extension are imported
on first use, so that the pure-Python parts (format, model loading, assets) work
without a build; using one of them without a build raises an ImportError that says
how to build.

This is the runtime. The tooling around it lives in subpackages that the runtime never
imports: ``sparamx.pipeline`` (``python -m sparamx.pipeline CONFIG``), ``sparamx.sweep``,
``sparamx.serve`` (the OpenAI-compatible server) and ``sparamx.tools`` (demo, random-weight
models); ``sparamx.cli`` is the ``sparamx`` command.
"""

from importlib import import_module

from .format import FORMAT_VERSION, PackedWeight, PackedWeightError, pack, reference_linear

__version__ = "0.1.0"

# name -> module that defines it, imported on first use
_LAZY = {
    "SparseLinear": ".layers",
    "DenseLinear": ".layers",
    "swap_linears": ".layers",
    "kernel_info": ".ops",
    "packed_linear": ".ops",
    "load": ".artifact",
    "save": ".artifact",
    "ArtifactError": ".artifact",
    "check": ".artifact",
    "read_manifest": ".artifact",
    "generate": ".generate",
    "Generation": ".generate",
    "generate_batch": ".batch",
    "BatchDecoder": ".batch",
    "SamplingParams": ".sampling",
    "chat": ".conversation",
    "KVSettings": ".kv",
    "enable_sparse_kv": ".kv",
    "disable_sparse_kv": ".kv",
    "load_model": ".models",
}

__all__ = [
    "FORMAT_VERSION",
    "PackedWeight",
    "PackedWeightError",
    "pack",
    "reference_linear",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'sparamx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
