"""Lean decoding (greedy, or sampling: ``sparamx.sampling``) for transformers causal LMs,
packed (``SparseLinear``) or plain.

``generate(model, tokenizer, prompt, max_new_tokens)`` follows gpt-fast: a preallocated
static KV cache (transformers' ``StaticCache``), an eager ``prefill`` of the prompt, and
a ``decode_one_token`` step compiled once with ``torch.compile`` (inductor, fullgraph;
our kernels are custom ops with fake kernels, so they trace) that ``decode_n_tokens``
calls for every further token. ``model.generate`` spends a large part of each token in
Python (generation loop, growing cache, module and mask plumbing, one dispatch per
small op); the compiled step leaves the linear kernels, lm_head and attention.

Greedy tokens equal ``model.generate(do_sample=False)`` token for token because the
logits are bitwise the same (checked on SmolLM2, dense and packed):

- attention: a static cache has ``max_cache_len`` slots, and attending over all of them
  with a mask sums in a different order than ``model.generate``'s growing cache does.
  During ``generate`` a model on ``sdpa`` runs ``lean_sdpa_attention``, which slices
  the cache to the filled positions and makes transformers' own unmasked SDPA call.
  The length comes in as the size of ``kv_positions``, marked dynamic, so one
  compiled graph serves every length (the model's attention setting is restored after);
- norms: inductor's fused RMSNorm reduces in another order than eager. Under inductor
  each norm module runs as ``sparamx::rms_norm`` (C++: the eager Llama- or Gemma-style
  arithmetic around ATen's own mean, checked bitwise against the module first) or,
  for other norms, as ``sparamx_lean::eager_norm``, an opaque op that calls the module
  back in Python; ``emulate_precision_casts`` keeps eager's bf16 roundings elsewhere.

``attention="fast"`` trades both points for speed: our decode attention kernel
(``sparamx::kv_decode_attention``) over the filled cache instead of SDPA, and norms
that inductor fuses with their neighbours (no op call per norm).

The cache and the compiled step live in a ``DecodeState`` per model and are reused
by later calls: the cache is reset, not reallocated, while prompt + new tokens fit
(lengths are rounded up to ``CACHE_BUCKET``); a longer request allocates a larger
cache and compiles once more. Batch size 1. The compiled step keeps the thread count
it was compiled with for its fused elementwise kernels (the linear kernels and
attention follow ``torch.set_num_threads``).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import types
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from . import sampling as sampling_mod

log = logging.getLogger(__name__)

CACHE_BUCKET = 256  # cache lengths are multiples of this (one compiled graph per length)
LEAN_ATTENTION = "sparamx_sdpa"
FAST_ATTENTION = "sparamx_fast"
# attention= of generate(): "exact" (transformers' SDPA call, bitwise model.generate) or
# "fast" (our decode attention kernel over the static cache; not bitwise, see below).
ATTENTION_MODES = {"exact": LEAN_ATTENTION, "fast": FAST_ATTENTION}
BACKENDS = ("inductor", "aot_eager", "eager")  # torch.compile backends for the decode step
DEFAULT_BACKEND = "inductor"
# Inductor: keep eager's bf16 rounding between fused ops (with the norms computed as eager
# does, the logits are bitwise eager's); no run-time size/alignment asserts on every op
# output (~2% of decode time on SmolLM2; the fake kernels are tested).
INDUCTOR_OPTIONS = {
    "emulate_precision_casts": True,
    "size_asserts": False,
    "alignment_asserts": False,
    "scalar_asserts": False,
}
# generation_config fields that would make model.generate differ from what the lean path
# does (the sampling fields and repetition_penalty are applied: sparamx.sampling).
_PROCESSOR_FIELDS = {
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}


@dataclass
class Generation:
    """What ``generate`` returns: the new tokens, their text, and timings (seconds)."""

    ids: list[int]  # new tokens only (an end-of-sequence token included, as in HF)
    text: str | None  # tokenizer.decode(ids), None without a tokenizer
    prompt_tokens: int
    ttft_s: float  # prompt ready -> first new token (prefill + argmax)
    token_times_s: list[float]  # time of each further token (tokens 2..n)
    compile_s: float  # compile + warm-up step before this call's clock started; 0 if none
    stop_reason: str  # "eos", "length", "stop" (stop string / token id), "cancelled"
    backend: str | None  # torch.compile backend of the decode step; None: eager
    cache_len: int  # KV cache length in tokens
    cache_reused: bool  # the cache of an earlier call was reset and reused
    total_s: float = field(default=0.0)  # prompt ready -> last token
    kv: dict | None = None  # sparse KV cache settings used (KVSettings fields); None: dense
    kv_bytes: int = 0  # bytes of cached K/V data at the end (sparse: compressed + window)
    kv_dense_bytes: int = 0  # the same tokens in a dense bf16 cache

    @property
    def ms_per_token(self) -> float | None:
        """Median decode time per token (tokens 2..n), ms."""
        if not self.token_times_s:
            return None
        times = sorted(self.token_times_s)
        return times[len(times) // 2] * 1e3

    @property
    def tokens_per_s(self) -> float | None:
        """Decode throughput (tokens 2..n) over their total time."""
        if not self.token_times_s:
            return None
        return len(self.token_times_s) / sum(self.token_times_s)


# ----------------------------------------------------------------- attention


def lean_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers' SDPA attention; for a one-token query given ``kv_positions`` (a
    tensor whose length L is the number of filled cache positions) it attends to the
    first L cached positions only, without a mask: the very call ``model.generate``
    makes with its growing cache, so the floats are the same. Shapes: query
    ``[b, h, 1, d]``, key/value ``[b, kv_heads, max_cache_len, d]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv_positions = kw.pop("kv_positions", None)
    if query.shape[2] == 1 and kv_positions is not None and kw.get("position_bias") is None:
        length = kv_positions.shape[0]
        key, value, attention_mask = key[:, :, :length], value[:, :, :length], None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
    )


def lean_fast_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """``attention="fast"``: a one-token query over the first ``len(kv_positions)`` cache
    positions runs ``sparamx::kv_decode_attention`` (our dense-cache decode kernel: each
    K/V byte read once per KV head for its whole GQA group; torch's SDPA spent ~60 us
    per layer per token on SmolLM2 heads). Its fp32 sums run in another order than
    SDPA's, so logits differ in the last bits and a greedy near-tie can go the other
    way. Anything else (prefill, soft-capping, sliding windows, ALiBi) goes to
    ``lean_sdpa_attention``."""
    kv_positions = kw.get("kv_positions")
    plain = not any(kw.get(name) is not None for name in ("position_bias", "softcap"))
    plain = plain and kw.get("sliding_window") is None
    if query.shape[2] != 1 or kv_positions is None or not plain:
        return lean_sdpa_attention(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
        )
    length = kv_positions.shape[0]
    out = dense_decode_attention(query, key[:, :, :length], value[:, :, :length], scaling)
    return out, None


def dense_decode_attention(query, key, value, scaling=None, lengths=None) -> torch.Tensor:
    """``sparamx::kv_decode_attention`` of one-token queries ``[b, heads, 1, d]`` over
    dense cache views ``[b, kv_heads, L, d]`` (each K/V byte read once per KV head;
    ``lengths`` ``[b]``: row i attends to its first ``lengths[i]`` tokens). Returns
    ``[b, 1, heads, d]``, as transformers' attention functions do."""
    from . import kv  # noqa: F401  (the op's fake kernel)

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if key.dtype != torch.bfloat16:  # fp32 models: the kernel reads a bf16 cache
        key, value = key.to(torch.bfloat16), value.to(torch.bfloat16)
    empty = key[:, :, :0]
    out = torch.ops.sparamx.kv_decode_attention(
        query[:, :, 0],
        empty,
        None,
        empty,
        None,
        0,
        key,
        value,
        float(scale),
        None,
        1,
        None,
        lengths,
    )
    return out.unsqueeze(1)


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(LEAN_ATTENTION, lean_sdpa_attention)
    AttentionMaskInterface.register(LEAN_ATTENTION, sdpa_mask)
    AttentionInterface.register(FAST_ATTENTION, lean_fast_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)


@contextmanager
def _lean_attention(model, attention: str = "exact", sparse: bool = False):
    """Run a model configured for ``sdpa`` on ``lean_sdpa_attention`` (or, ``"fast"``,
    ``lean_fast_attention``; ``sparse``: ``kv_static.static_kv_attention``); restore
    after. Yields whether it did (other attention implementations keep the static mask;
    the sparse cache refuses them). A model that ``kv.enable_sparse_kv`` switched to
    ``"sparamx_kv"`` counts as ``sdpa``: on a cache other than its own that function is
    transformers' SDPA."""
    from .kv import ATTENTION_NAME

    config = model.config
    old = getattr(config, "_attn_implementation", None)
    swap = old in ("sdpa", ATTENTION_NAME)
    if sparse and not swap:
        raise ValueError(
            f"kv: the sparse KV cache needs a model on sdpa attention, this one uses {old!r}; "
            f"load it with attn_implementation='sdpa' or pass kv=False"
        )
    if swap:
        _register_attention()
        config._attn_implementation = ATTENTION_MODES[attention]
        if sparse:
            from . import kv_static

            kv_static.register()
            config._attn_implementation = kv_static.STATIC_ATTENTION
    try:
        yield swap
    finally:
        if swap:
            config._attn_implementation = old


# -------------------------------------------------------------------- norms

# The model's norm modules, called by ``sparamx_lean::eager_norm`` (key -> (forward,
# output dtype)); filled from the decode state while a compiled step may run.
_NORMS: dict[int, tuple[Callable, torch.dtype]] = {}


@torch.library.custom_op("sparamx_lean::eager_norm", mutates_args=())
def eager_norm(x: torch.Tensor, key: int) -> torch.Tensor:
    """The model's own norm module ``key``, run eagerly: inductor sees one opaque op
    instead of fusing (and reordering) the norm's mean reduction."""
    return _NORMS[key][0](x)


@eager_norm.register_fake
def _(x, key):
    return x.new_empty(x.shape, dtype=_NORMS[key][1])


def _is_norm(mod: nn.Module) -> bool:
    name = type(mod).__name__
    return (name.endswith("RMSNorm") or isinstance(mod, nn.LayerNorm)) and isinstance(
        getattr(mod, "weight", None), torch.Tensor
    )


def _native_norm(mod: nn.Module, dtype: torch.dtype) -> Callable | None:
    """``torch.ops.sparamx.rms_norm`` bound to ``mod``'s weight and epsilon when it gives
    bitwise the module's own output on sample inputs (Llama-style or Gemma-style);
    None when neither form matches (the module then stays on its Python forward)."""
    from . import ops  # noqa: F401  (registers torch.ops.sparamx.rms_norm's fake)

    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if not isinstance(eps, float) or isinstance(mod, nn.LayerNorm):
        return None
    gen = torch.Generator().manual_seed(0)
    width = mod.weight.shape[-1]
    samples = [
        torch.randn(n, width, generator=gen).mul(scale).to(dtype)
        for n, scale in ((1, 1.0), (3, 30.0), (2, 1e-3))
    ]
    for offset in (False, True):
        fn = functools.partial(
            torch.ops.sparamx.rms_norm, weight=mod.weight, eps=eps, offset_weight=offset
        )
        try:
            pairs = [(fn(x), mod(x)) for x in samples]
        except RuntimeError:
            return None
        if all(ours.dtype == theirs.dtype and torch.equal(ours, theirs) for ours, theirs in pairs):
            return fn
    return None


def _norm_wrappers(model) -> list[tuple[nn.Module, Callable, Callable, torch.dtype]]:
    """(module, its eager forward, the replacement forward, output dtype) per norm: the
    native ``sparamx::rms_norm`` where it is bitwise the module's, else the opaque
    ``eager_norm`` that calls the module back."""
    out = []
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        for key, mod in enumerate(m for m in model.modules() if _is_norm(m)):
            out_dtype = mod(torch.zeros(1, mod.weight.shape[-1], dtype=dtype)).dtype
            native = _native_norm(mod, dtype)
            replacement = native or functools.partial(eager_norm, key=key)
            out.append((mod, mod.forward, replacement, out_dtype))
    return out


@contextmanager
def _opaque_norms(wrappers):
    """Route the norms through ``eager_norm`` (same floats as eager) while compiled."""
    _NORMS.clear()
    for key, (mod, forward, replacement, out_dtype) in enumerate(wrappers):
        _NORMS[key] = (forward, out_dtype)
        mod.forward = replacement
    try:
        yield
    finally:
        for mod, *_ in wrappers:
            del mod.forward


# ------------------------------------------------------------ decoding steps


def prefill(model, input_ids: torch.Tensor, cache, choose: Callable | None = None) -> torch.Tensor:
    """Run the prompt ``[1, T]`` through the model (eager), filling the cache; return
    the first new token ``[1, 1]`` (the argmax, or ``choose(logits [1, vocab])``). Only
    the last position's logits are computed, as in ``model.generate``."""
    kw = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    logits = model(input_ids, cache=cache, use_cache=True, **kw).logits
    if choose is not None:
        return choose(logits[:, -1])
    return logits[:, -1].argmax(-1, keepdim=True)


def decode_one_token(
    model, token: torch.Tensor, position: torch.Tensor, cache, kv_positions=None, kv_window=None
) -> torch.Tensor:
    """One decode step: token ``[1, 1]`` at ``position`` ``[1, 1]`` -> next token
    ``[1, 1]``; ``kv_positions`` (length = filled cache positions) goes to
    ``lean_sdpa_attention``; with the sparse cache, ``kv_window`` (length = its dense
    window's tokens) and the cache go to ``kv_static.static_kv_attention``. This is the
    function ``torch.compile`` compiles."""
    extra = {} if kv_positions is None else {"kv_positions": kv_positions}
    if kv_window is not None:
        extra.update(kv_window=kv_window, sparamx_kv=cache)
    logits = model(token, position_ids=position, cache=cache, use_cache=True, **extra).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def decode_one_logits(
    model, token: torch.Tensor, position: torch.Tensor, cache, kv_positions=None, kv_window=None
) -> torch.Tensor:
    """``decode_one_token`` returning the last position's logits ``[1, vocab]``: the
    step compiled for sampling (the token is chosen outside, by a ``TokenChooser``)."""
    extra = {} if kv_positions is None else {"kv_positions": kv_positions}
    if kv_window is not None:
        extra.update(kv_window=kv_window, sparamx_kv=cache)
    logits = model(token, position_ids=position, cache=cache, use_cache=True, **extra).logits
    return logits[:, -1]


def decode_n_tokens(
    step: Callable,
    model,
    token: torch.Tensor,
    start: int,
    n: int,
    state: DecodeState,
    eos_ids: set[int],
    on_token: Callable[[int], str | None],
    sparse=None,
) -> str:
    """Feed ``token`` (at position ``start``) and up to ``n - 1`` further tokens through
    ``step``, calling ``on_token`` with each new id; stop early at an end-of-sequence
    token, or when ``on_token`` returns a stop reason. ``sparse``: a
    ``kv_static.StaticSparseKVCache`` to decode with instead of the decode state's dense
    cache. Returns the stop reason: ``"eos"``, ``"length"`` or ``on_token``'s."""
    dynamic = step is not decode_one_token
    for i in range(n):
        pos = start + i
        if sparse is None:
            token = step(
                model,
                token,
                torch.tensor([[pos]]),
                state.cache,
                state.kv_positions(pos + 1, dynamic),
            )
        else:
            kv, window = sparse.step_inputs(dynamic)
            token = step(model, token, torch.tensor([[pos]]), sparse, kv, window)
            sparse.advance()  # count the token; compress a block that left the window
        tid = int(token)
        why = on_token(tid)
        if tid in eos_ids:
            return "eos"
        if why:
            return why
    return "length"


# --------------------------------------------------------- decode state


@dataclass
class DecodeState:
    """Per-model state reused across calls: the static cache and the compiled steps."""

    cache: object  # transformers.StaticCache
    cache_len: int
    lean_attention: bool = False  # lean_*_attention active: pass kv_positions
    # (backend, attention[, kv settings]) -> compiled step; the same + cache_len: compiled
    steps: dict[tuple, Callable] = field(default_factory=dict)
    warm: set[tuple] = field(default_factory=set)
    sparse: dict = field(default_factory=dict)  # KVSettings -> StaticSparseKVCache
    norms: list | None = None  # _norm_wrappers(model), made on first compiled use

    def __post_init__(self):
        self.positions = torch.arange(self.cache_len)  # kv_positions are views of it

    def use_cache(self, cache, cache_len: int) -> None:
        """Switch to a new cache (another length: a compiled step recompiles for it)."""
        self.cache, self.cache_len = cache, cache_len
        self.positions = torch.arange(cache_len)

    def kv_positions(self, length: int, dynamic: bool) -> torch.Tensor | None:
        """``positions[:length]``; under compile its length is a symbolic size (one
        graph for every length 2 .. cache_len - 1)."""
        if not self.lean_attention:
            return None
        view = self.positions[:length]
        if dynamic:
            torch._dynamo.mark_dynamic(view, 0, min=2, max=self.cache_len - 1)
        return view


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


def _max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _cache_length(model, need: int, current: int, max_cache_len: int | None) -> int:
    """``max_cache_len`` if given, else ``need`` rounded up to ``CACHE_BUCKET`` and at
    least the ``current`` length (a cache only grows), capped by the model's context."""
    if max_cache_len is not None:
        return max_cache_len
    length = max(_bucket(need), current)
    limit = _max_positions(model)
    return min(length, limit) if limit else length


def _decode_state(model, need: int, max_cache_len: int | None) -> tuple[DecodeState, bool]:
    """The model's decode state with a cache of at least ``need`` tokens (exactly
    ``max_cache_len`` when given); returns (state, whether the cache was reused).
    (transformers allocates a ``StaticCache``'s tensors on first use.)"""
    from transformers import StaticCache

    state = _STATES.get(model)
    length = _cache_length(model, need, state.cache_len if state else 0, max_cache_len)
    if state is not None and state.cache_len == length:
        state.cache.reset()
        return state, True
    cache = StaticCache(config=model.config, max_cache_len=length)
    if state is None:
        state = DecodeState(cache, length)
        _STATES[model] = state
    else:
        state.use_cache(cache, length)
    return state, False


def _sparse_cache(model, state: DecodeState, settings, need: int, max_cache_len: int | None):
    """The decode state's static sparse KV cache for ``settings`` holding at least ``need``
    tokens, reset; returns (cache, whether it was reused)."""
    from .kv_static import StaticSparseKVCache

    old = state.sparse.get(settings)
    length = _cache_length(model, need, old.max_len if old else 0, max_cache_len)
    if old is not None and old.max_len == length:
        old.reset()
        return old, True
    state.sparse[settings] = StaticSparseKVCache(settings, model.config, length)
    return state.sparse[settings], False


def _backend(compile: bool | str) -> str | None:
    if compile is False:
        return None
    if compile is True:
        return DEFAULT_BACKEND
    if compile in BACKENDS:
        return compile
    raise ValueError(f"compile must be True, False or one of {BACKENDS}, got {compile!r}")


def _own_step(f: Callable = decode_one_token) -> Callable:
    """A copy of ``f`` (a decode step) with its own code object: dynamo keeps compiled
    graphs per code object, so each model's graphs stay apart (its guards need not
    tell models apart; see ``_compiled_step``)."""
    return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__)


def _compiled_step(
    state: DecodeState, backend: str, attention: str, kv=None, logits: bool = False
) -> Callable:
    """The decode state's compiled step. Dynamo checks guards before every call; on a
    packed model the guards on its modules cost ~2.7 ms per token (SmolLM2-135M), so
    they are skipped: the step is the state's own (one model), and the modules it
    traced do not change while the state lives (``release`` drops it). Guards on
    tensors (the cache, its length) stay. Each attention mode has its own step (the
    mode is a model-config setting, which the skipped guards would not see change), and
    so has each sparse KV setting ``kv`` (its cache holds other arrays).
    (Inductor's ``cpp_wrapper`` would cut the Python wrapper's per-kernel cost too, but
    compiling SmolLM2's step with it took 326 s instead of 38 s here.) ``logits``: the
    step that returns the logits (``decode_one_logits``, for sampling), keyed apart, as
    is each sparse KV setting ``kv`` (its cache holds other arrays)."""
    key = (backend, attention) + (("logits",) if logits else ()) + (() if kv is None else (kv,))
    if key not in state.steps:
        state.steps[key] = compile_step(decode_one_logits if logits else decode_one_token, backend)
    return state.steps[key]


def compile_step(fn: Callable, backend: str) -> Callable:
    """``torch.compile`` of a decode step ``fn`` as the lean loops run it: its own copy
    (``_own_step``), guards on the model's modules skipped (see ``_compiled_step``),
    inductor keeping eager's bf16 roundings (``INDUCTOR_OPTIONS``)."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if backend == "inductor":
        options.update(INDUCTOR_OPTIONS)
    return torch.compile(_own_step(fn), fullgraph=True, backend=backend, options=options)


def _step_context(model, state: DecodeState, backend: str | None, attention: str):
    """What the decode steps run under: for exact attention, inductor gets the norms as
    opaque ops with the eager floats. ``"fast"`` lets inductor fuse the norms with their
    neighbours (not bitwise, like the fast attention; one op call fewer per norm)."""
    if backend != "inductor" or attention != "exact":
        return nullcontext()
    if state.norms is None:
        state.norms = _norm_wrappers(model)
    return _opaque_norms(state.norms)


def _warm_key(backend: str, attention: str, cache_len: int, logits: bool, kv=None) -> tuple:
    key = (backend, attention, cache_len) + (("logits",) if logits else ())
    return key if kv is None else key + (kv,)


def _warm_up(
    model, state: DecodeState, backend: str, attention: str, logits: bool = False, sparse=None
) -> float:
    """Compile the decode step for the state's cache, or for the sparse cache
    ``sparse`` (one dummy prefill and step, then reset the cache); returns the seconds
    spent."""
    kv = None if sparse is None else sparse.settings
    step = _compiled_step(state, backend, attention, kv, logits)
    t0 = time.perf_counter()
    cache = state.cache if sparse is None else sparse
    token = prefill(model, torch.zeros((1, 1), dtype=torch.long), cache)
    if sparse is None:
        step(model, token, torch.tensor([[1]]), cache, state.kv_positions(2, dynamic=True))
        state.warm.add(_warm_key(backend, attention, state.cache_len, logits))
    else:
        sparse.begin_decode()
        # Both lengths are 2 here; dynamo would give equal sizes one symbol (duck
        # shaping) and tie the cache's length to the window's for good.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            step(model, token, torch.tensor([[1]]), sparse, *sparse.step_inputs(dynamic=True))
        state.warm.add(_warm_key(backend, attention, sparse.max_len, logits, kv))
    cache.reset()
    return time.perf_counter() - t0


def release(model) -> None:
    """Drop the model's cached decode state (its KV cache memory)."""
    _STATES.pop(model, None)


# ------------------------------------------------------------------- inputs


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _prompt_ids(tokenizer, prompt) -> torch.Tensor:
    """``[1, T]`` token ids from a string (through the tokenizer) or from ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
    elif isinstance(prompt, Sequence):
        ids = torch.tensor([list(prompt)], dtype=torch.long)
    else:
        raise TypeError(f"prompt must be a str, a list of ids or a tensor, got {type(prompt)}")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"one prompt at a time: got token ids of shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty (0 tokens)")
    return ids.long()


def _check_fits(prompt_len: int, max_new_tokens: int, max_cache_len: int | None, model) -> None:
    limit = max_cache_len if max_cache_len is not None else _max_positions(model)
    what = (
        f"the KV cache (max_cache_len={max_cache_len})"
        if max_cache_len is not None
        else f"the model's context (max_position_embeddings={limit})"
    )
    if limit is None:
        return
    if prompt_len >= limit:
        raise ValueError(
            f"prompt is too long: {prompt_len} tokens, but {what} holds {limit}; "
            f"shorten the prompt or pass a larger max_cache_len"
        )
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} tokens do not fit {what}, which holds {limit}; "
            f"ask for at most {limit - prompt_len} new tokens or pass a larger max_cache_len"
        )


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _warn_processors(model) -> None:
    gc = model.generation_config
    set_fields = []
    for name, default in _PROCESSOR_FIELDS.items():
        value = getattr(gc, name, default)
        if value is not None and value != default and value != [] and value != {}:
            set_fields.append(name)
    if set_fields:
        log.warning(
            "generation_config sets %s: model.generate applies them, the lean path does "
            "plain greedy argmax (outputs may differ)",
            ", ".join(set_fields),
        )


class _StopWatch:
    """The per-token checks of ``generate`` beyond end-of-sequence: stop strings and
    streaming (``sampling.StopText``), stop token ids, ``should_stop``."""

    def __init__(self, tokenizer, params, stream, should_stop):
        self.tokenizer = tokenizer
        self.stop_ids = set(params.stop_token_ids)
        self.should_stop = should_stop
        self.text = None
        if stream is not None or params.stop:
            self.text = sampling_mod.StopText(tokenizer, params.stop, stream)

    def put(self, tid: int) -> str | None:
        if self.text is not None and self.text.put(tid):
            return "stop"
        if tid in self.stop_ids:
            return "stop"
        if self.should_stop is not None and self.should_stop():
            return "cancelled"
        return None

    def finish(self, stop: str) -> None:
        if self.text is not None and stop != "stop":
            self.text.finish()

    def final_text(self, ids: list[int], stop: str) -> str | None:
        """``tokenizer.decode(ids)``; after a stop string, the text before it (decoded
        without special tokens, as streamed)."""
        if self.tokenizer is None:
            return None
        if stop == "stop" and self.text is not None and self.text.stopped:
            return self.text.text
        return self.tokenizer.decode(ids)


def _default_max_new_tokens(model) -> int:
    value = getattr(model.generation_config, "max_new_tokens", None)
    return value if value is not None else sampling_mod.DEFAULT_MAX_NEW_TOKENS


def _choose_step(state, backend, attention, chooser, kv=None) -> Callable:
    """The decode step: token in, next token out. Greedy: ``decode_one_token`` (the
    argmax inside the compiled graph); sampling: ``decode_one_logits`` then
    ``chooser`` on its logits, outside the graph. ``kv``: the sparse KV settings."""
    if chooser is None:
        return _compiled_step(state, backend, attention, kv) if backend else decode_one_token
    raw = (
        _compiled_step(state, backend, attention, kv, logits=True) if backend else decode_one_logits
    )

    def step(model, token, position, cache, *kv_inputs):
        return chooser(raw(model, token, position, cache, *kv_inputs))

    return step


# ------------------------------------------------------------------ generate


def generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    stream: Callable[[str], object] | None = None,
    compile: bool | str = True,
    max_cache_len: int | None = None,
    stop_at_eos: bool = True,
    attention: str = "exact",
    should_stop: Callable[[], bool] | None = None,
    kv=None,
    **sampling,
) -> Generation:
    """Greedy decoding (or sampling) of one prompt with a static KV cache and a
    compiled decode step.

    ``prompt``: text (needs ``tokenizer``) or token ids. ``stream``: called with each
    new piece of text as it is decoded. ``compile``: compile the decode step (compile
    time is reported in ``compile_s``, outside ``ttft_s`` and the per-token times).
    ``max_cache_len``: a fixed KV cache length (default: prompt + new tokens rounded up
    to ``CACHE_BUCKET``, grown as later calls need, capped by the model's context).
    Stops at the model's end-of-sequence token, like ``model.generate``, unless
    ``stop_at_eos`` is False (benchmarks: always ``max_new_tokens`` tokens).
    ``attention``: ``"exact"`` (default) decodes with transformers' own SDPA call, so
    the tokens are ``model.generate``'s bitwise; ``"fast"`` uses our decode attention
    kernel (faster; its sums run in another order, so a greedy near-tie can differ).
    Both apply to models set up for ``sdpa`` attention; others keep their own.

    ``**sampling``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``seed``, ``stop`` (strings; the text ends before the
    first), ``stop_token_ids`` (``sparamx.sampling.SamplingParams``; transformers'
    names and defaults, unset ones from ``model.generation_config``). Greedy (the
    default unless the generation config asks for sampling) is the plain argmax; a
    given ``seed`` makes sampling reproducible. ``max_new_tokens`` None: the generation
    config's, else ``DEFAULT_MAX_NEW_TOKENS``. ``should_stop``: checked after every
    token; True ends the generation (``stop_reason`` ``"cancelled"``).
    ``kv``: the sparse KV cache (``kv.KVSettings`` or its dict): prompt and new tokens
    are pruned as they leave its dense window and decode attention reads the compressed
    cache (``sparamx.kv_static``). ``None`` (default): the settings the model carries
    (``sparamx.load`` of an artifact that records them, ``kv.enable_sparse_kv``), else
    the dense cache; ``False``: the dense cache. A setting that prunes nothing
    (method ``none`` or both sparsities 0) runs the dense cache, bitwise as ``kv=False``.
    With ``attention="exact"`` the tokens equal ``model.generate``'s with the same
    sparse cache; ``"fast"`` lets inductor fuse the norms (not bitwise).
    """
    params, max_new_tokens = _checked_request(
        model, tokenizer, attention, max_new_tokens, max_cache_len, stream, sampling
    )
    settings = _kv_settings(model, kv)
    ids = _prompt_ids(tokenizer, prompt)
    prompt_len = ids.shape[1]
    _check_fits(prompt_len, max_new_tokens, max_cache_len, model)
    _warn_processors(model)
    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    watch = _StopWatch(tokenizer, params, stream, should_stop)
    chooser = None if params.greedy_argmax else sampling_mod.TokenChooser(params, ids)
    sample = chooser is not None

    backend = _backend(compile)
    sparse_mode = settings is not None
    with torch.inference_mode(), _lean_attention(model, attention, sparse_mode) as swapped:
        need = prompt_len + max_new_tokens
        state, reused, sparse, cache, cache_len = _caches(
            model, need, max_cache_len, settings, swapped
        )
        warm = _warm_key(backend, attention, cache_len, sample, settings)
        compile_s = 0.0
        if backend and warm not in state.warm:
            with _step_context(model, state, backend, attention):
                compile_s = _warm_up(model, state, backend, attention, sample, sparse)
        step = _choose_step(state, backend, attention, chooser, settings)

        new: list[int] = []
        stamps: list[float] = []

        def on_token(tid: int) -> str | None:
            new.append(tid)
            why = watch.put(tid)
            stamps.append(time.perf_counter())
            return why

        start = time.perf_counter()
        token = prefill(model, ids, cache, chooser)
        if sparse is not None:
            sparse.begin_decode()
        why = on_token(int(token))
        stop = "eos" if new[0] in eos else why or "length"
        if stop == "length" and max_new_tokens > 1:
            with _step_context(model, state, backend, attention):
                stop = decode_n_tokens(
                    step, model, token, prompt_len, max_new_tokens - 1, state, eos, on_token, sparse
                )
        watch.finish(stop)

    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    kv_bytes, kv_dense = _kv_bytes(model, sparse, prompt_len + len(new) - 1, cache)
    return Generation(
        ids=new,
        text=watch.final_text(new, stop),
        prompt_tokens=prompt_len,
        ttft_s=stamps[0] - start,
        token_times_s=times,
        compile_s=compile_s,
        stop_reason=stop,
        backend=backend,
        cache_len=cache_len,
        cache_reused=reused,
        total_s=stamps[-1] - start,
        kv=None if settings is None else settings.to_dict(),
        kv_bytes=kv_bytes,
        kv_dense_bytes=kv_dense,
    )


def _checked_request(model, tokenizer, attention, max_new_tokens, max_cache_len, stream, sampling):
    """``generate``'s argument checks: the resolved ``SamplingParams`` and
    ``max_new_tokens`` (None: the model's default)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_MODES)}, got {attention!r}")
    params = sampling_mod.SamplingParams.resolve(model.generation_config, **sampling)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(model)
    _check_positive_int("max_new_tokens", max_new_tokens)
    if max_cache_len is not None:
        _check_positive_int("max_cache_len", max_cache_len)
    if (stream is not None or params.stop) and tokenizer is None:
        raise ValueError("stream and stop strings need a tokenizer to turn tokens into text")
    return params, max_new_tokens


def _caches(model, need: int, max_cache_len: int | None, settings, swapped: bool):
    """The decode state and the cache ``generate`` decodes into, for ``need`` positions:
    ``(state, reused, sparse cache or None, cache, cache length)``."""
    if settings is not None:
        state = _STATES.get(model) or _decode_state(model, need, max_cache_len)[0]
        sparse, reused = _sparse_cache(model, state, settings, need, max_cache_len)
        return state, reused, sparse, sparse, sparse.max_len
    state, reused = _decode_state(model, need, max_cache_len)
    state.lean_attention = swapped and not any(state.cache.is_sliding)
    return state, reused, None, state.cache, state.cache_len


def _kv_settings(model, kv):
    """The ``kv.KVSettings`` that ``generate`` runs the sparse cache with, or None for
    the dense cache (see ``generate``'s ``kv``)."""
    from .kv import KVSettings

    if kv is None:
        kv = getattr(model, "_sparamx_kv", None)  # sparamx.load / kv.enable_sparse_kv
    if kv is None or kv is False:
        return None
    if isinstance(kv, dict):
        kv = KVSettings.from_dict(kv)
    if not isinstance(kv, KVSettings):
        raise TypeError(f"kv must be a KVSettings, a dict of its fields, None or False, got {kv!r}")
    if kv.method == "none" or (kv.k_sparsity == 0 and kv.v_sparsity == 0):
        return None  # nothing pruned: the dense static cache (bitwise as kv=False)
    from .kv_static import check_model

    check_model(model.config, kv)
    return kv


def _kv_bytes(model, sparse, tokens: int, cache) -> tuple[int, int]:
    """(bytes the cache holds for ``tokens`` cached tokens, the same in dense bf16)."""
    if sparse is not None:
        return sparse.nbytes(), sparse.dense_nbytes()
    from .kv import cache_dims

    layers, heads, d = cache_dims(model.config)
    per_dtype = 2 * layers * heads * d * tokens  # K and V elements
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    size = layer.keys.element_size() if getattr(layer, "is_initialized", False) else 2
    return per_dtype * size, per_dtype * 2


class _CallableModule(types.ModuleType):
    """``sparamx.generate`` names both this module and its function: importing the
    module (``import sparamx.generate``) binds the module as the package attribute, so
    the module forwards calls to ``generate``."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
