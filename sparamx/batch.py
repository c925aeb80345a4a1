"""Batched decoding with continuous batching: several sequences decoded together, one
token each per step, sequences joining and leaving between steps.

Decode is bound by reading the weights: one step at batch size M reads every packed
weight once for all M rows (the kernels' small-M paths, ``sparamx/csrc/ops.cpp``), so
M sequences cost about one. ``BatchDecoder`` holds one dense KV cache of ``slots``
sequences x ``max_len`` tokens per decoder layer (``BatchKV``). ``add`` prefills a new
sequence alone into a free row (eager) and chooses its first token; ``step`` runs the
active sequences' next tokens through the model at once (rows ``0..n-1``; a finished
sequence's row is refilled by moving the last row down, so the active rows stay
contiguous and no step reads a hole).

Inside a step every row sits at its own position: the new tokens' K/V are written at
each row's own length and a boolean mask ``[n, 1, 1, L]`` (``L``: the longest row) hides
each row's unfilled tail. This runs as the transformers attention function
``"sparamx_batch"`` (on a bf16 cache: our decode attention kernel, each row over its own
length; else SDPA with the mask): the model gets ``use_cache=False`` (no transformers
cache) and the ``BatchKV`` through the attention kwargs; rotary positions come from
``position_ids`` ``[n, 1]``. The step is compiled once with the batch size and ``L`` as
symbolic sizes (dynamo specialises batch size 1, so that size compiles once more).

Rows see the same floats as the same sequence decoded alone only up to the kernels'
summation order at another M; tests check the logits against a per-sequence forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import sampling as sampling_mod
from .generate import (
    Generation,
    _backend,
    _check_positive_int,
    _checked_request,
    _eos_ids,
    _max_positions,
    _prompt_ids,
    _StopWatch,
    compile_step,
    dense_decode_attention,
)
from .kv import cache_dims
from .kv_static import KERNEL_MAX_HEAD_DIM

BATCH_ATTENTION = "sparamx_batch"
DEFAULT_SLOTS = 8


# ----------------------------------------------------------------- the cache


class BatchKV:
    """Dense K and V for ``slots`` sequences of up to ``max_len`` tokens, one pair of
    ``[slots, kv_heads, max_len + 1, head_dim]`` tensors per decoder layer, allocated
    on the first prefill (in its dtype)."""

    def __init__(self, config, slots: int, max_len: int):
        self.layers, self.heads, self.head_dim = cache_dims(config)
        self.slots, self.max_len = slots, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def allocate(self, dtype: torch.dtype) -> None:
        if self.keys:
            return
        # One position more than max_len: a step's view [:n, :, :L] is then never the
        # whole tensor (dynamo would guard on L != max_len, i.e. specialise on it).
        shape = (self.slots, self.heads, self.max_len + 1, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(self.layers)]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` tokens to row ``dst``."""
        with torch.inference_mode():
            for k, v in zip(self.keys, self.values, strict=True):
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]


def batch_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers attention function ``"sparamx_batch"``. With ``batch_kv`` (a
    ``BatchKV``) and ``batch_row``: a prefill of one sequence, its K/V written to that
    row, attention over the prompt itself. With ``batch_kv`` and ``batch_positions``
    (``[n]``, each row's new position): a decode step, the new K/V written at those
    positions and each row attending to its own filled positions through
    ``attention_mask`` ``[n, 1, 1, L]``. Without ``batch_kv``: transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kvc = kw.pop("batch_kv", None)
    row = kw.pop("batch_row", None)
    positions = kw.pop("batch_positions", None)
    if kvc is not None:
        keys, values = kvc.keys[module.layer_idx], kvc.values[module.layer_idx]
        if positions is None:  # prefill of one sequence into its row
            t = key.shape[2]
            keys[row, :, :t] = key[0]
            values[row, :, :t] = value[0]
        else:  # decode step: rows 0..n-1, each at its own position
            n = query.shape[0]
            rows = torch.arange(n)
            keys[rows, :, positions] = key[:, :, 0]
            values[rows, :, positions] = value[:, :, 0]
            length = attention_mask.shape[-1]
            key, value = keys[:n, :, :length], values[:n, :, :length]
            if key.dtype == torch.bfloat16 and query.shape[-1] <= KERNEL_MAX_HEAD_DIM:
                return dense_decode_attention(query, key, value, scaling, positions + 1), None
            is_causal = False
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
    )


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(BATCH_ATTENTION, batch_attention)
    AttentionMaskInterface.register(BATCH_ATTENTION, sdpa_mask)


def check_model(model) -> None:
    """Refuse what the batch attention does not compute, naming the setting."""
    from .kv import ATTENTION_NAME

    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", ATTENTION_NAME, BATCH_ATTENTION):
        raise ValueError(
            f"batched decode needs a model on sdpa attention, this one uses {impl!r}; load it "
            f"with attn_implementation='sdpa'"
        )
    text = config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        raise ValueError(
            "batched decode does not serve sliding-window attention layers (layer_types); "
            "decode one sequence at a time with sparamx.generate"
        )
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            "batched decode does not compute attention logit soft-capping "
            "(attn_logit_softcapping); decode one sequence at a time with sparamx.generate"
        )


@contextmanager
def _batch_attention(model):
    """The model on ``"sparamx_batch"`` attention (registered by ``BatchDecoder``)."""
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = BATCH_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = old


# ----------------------------------------------------------------- the steps


def prefill_row(model, input_ids: torch.Tensor, kvc: BatchKV, row: int) -> torch.Tensor:
    """The prompt ``[1, T]`` through the model into row ``row`` of ``kvc``; returns the
    last position's logits ``[1, vocab]``."""
    kw = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    t = input_ids.shape[1]
    out = model(
        input_ids,
        position_ids=torch.arange(t).unsqueeze(0),
        use_cache=False,
        batch_kv=kvc,
        batch_row=row,
        **kw,
    )
    return out.logits[:, -1]


def batch_step(model, tokens, positions, mask, kvc) -> torch.Tensor:
    """One decode step of rows ``0..n-1``: ``tokens`` and ``positions`` ``[n, 1]``,
    ``mask`` ``[n, 1, 1, L]`` -> next-token logits ``[n, vocab]``. The function that
    ``torch.compile`` compiles."""
    out = model(
        tokens,
        position_ids=positions,
        attention_mask=mask,
        use_cache=False,
        batch_kv=kvc,
        batch_positions=positions[:, 0],
    )
    return out.logits[:, -1]


# ------------------------------------------------------------- the sequences


@dataclass(eq=False)  # compared by identity (rows.index)
class BatchSequence:
    """One sequence of a ``BatchDecoder``: its state while it decodes and, once done,
    its ``result`` (a ``Generation``, as ``sparamx.generate`` returns)."""

    prompt_len: int
    max_new_tokens: int
    eos: set[int]
    watch: _StopWatch
    chooser: sampling_mod.TokenChooser | None
    tag: object = None  # the caller's (e.g. the server's job)
    ids: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    start: float = 0.0
    stop_reason: str | None = None
    result: Generation | None = None

    @property
    def length(self) -> int:
        """Tokens in the cache once the last chosen token is fed back."""
        return self.prompt_len + len(self.ids)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from ``logits [1, vocab]``, recorded and checked for a stop."""
        if self.chooser is None:
            tid = int(logits.argmax(-1))
        else:
            tid = int(self.chooser(logits))
        self.ids.append(tid)
        why = self.watch.put(tid)
        self.stamps.append(time.perf_counter())
        if tid in self.eos:
            self.stop_reason = "eos"
        elif why:
            self.stop_reason = why
        elif len(self.ids) >= self.max_new_tokens:
            self.stop_reason = "length"
        return tid

    def finish(self, cache_len: int, backend: str | None) -> Generation:
        self.watch.finish(self.stop_reason)
        times = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]
        self.result = Generation(
            ids=self.ids,
            text=self.watch.final_text(self.ids, self.stop_reason),
            prompt_tokens=self.prompt_len,
            ttft_s=self.stamps[0] - self.start,
            token_times_s=times,
            compile_s=0.0,
            stop_reason=self.stop_reason,
            backend=backend,
            cache_len=cache_len,
            cache_reused=True,
            total_s=self.stamps[-1] - self.start,
        )
        return self.result


# --------------------------------------------------------------- the decoder


class BatchDecoder:
    """Continuous batching over one model: up to ``slots`` sequences of up to
    ``max_len`` tokens (prompt + new) each. ``add`` a sequence whenever ``free`` > 0,
    ``step`` while ``active``; a sequence that ``step`` (or ``add``) returns is done
    and carries its ``result``. ``compile``: compile the decode step (True: inductor,
    or a backend name; the first steps at batch size 1 and >= 2 compile)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        slots: int = DEFAULT_SLOTS,
        max_len: int | None = None,
        compile: bool | str = True,
    ):
        _check_positive_int("slots", slots)
        check_model(model)
        limit = _max_positions(model)
        if max_len is None:
            max_len = min(2048, limit) if limit else 2048
        _check_positive_int("max_len", max_len)
        if limit is not None and max_len > limit:
            raise ValueError(
                f"max_len={max_len} is longer than the model's context "
                f"(max_position_embeddings={limit})"
            )
        self.model, self.tokenizer = model, tokenizer
        self.kv = BatchKV(model.config, slots, max_len)
        _register()  # once here, not on every step
        self.backend = _backend(compile)
        self._step = compile_step(batch_step, self.backend) if self.backend else batch_step
        self.rows: list[BatchSequence] = []  # row i of the cache holds rows[i]
        self.positions = torch.arange(max_len)
        self.steps = 0

    @property
    def slots(self) -> int:
        return self.kv.slots

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def add(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        stream: Callable[[str], object] | None = None,
        stop_at_eos: bool = True,
        tag: object = None,
        **sampling,
    ) -> BatchSequence:
        """Prefill ``prompt`` into a free row and choose its first token (sampling
        options and stops as in ``sparamx.generate``). Returns the sequence; if that
        first token already ends it, it is done (``result`` set) and holds no row."""
        if not self.free:
            raise RuntimeError(f"all {self.slots} slots are in use; step until one frees")
        seq, ids = self._new_sequence(prompt, max_new_tokens, stream, stop_at_eos, tag, sampling)
        seq.start = time.perf_counter()
        with torch.inference_mode(), _batch_attention(self.model):
            self._allocate()
            logits = prefill_row(self.model, ids, self.kv, len(self.rows))
        self.rows.append(seq)
        seq.choose(logits)
        if seq.stop_reason is not None:
            self._retire(len(self.rows) - 1)
        return seq

    def _allocate(self) -> None:
        dtype = next(self.model.parameters()).dtype  # the activations' (and K/V's) dtype
        self.kv.allocate(dtype if dtype.is_floating_point else torch.bfloat16)

    def step(self, should_stop: Callable[[BatchSequence], bool] | None = None):
        """One new token for every active sequence; returns those that finished (their
        rows are freed). ``should_stop(seq)``: checked after each token; True ends that
        sequence (``stop_reason`` ``"cancelled"``)."""
        n = len(self.rows)
        if n == 0:
            return []
        # The inputs are made in inference mode whatever the caller's mode (a caller
        # inside torch.inference_mode would otherwise hand the compiled step inference
        # tensors one time and normal ones another: a recompile each switch).
        with torch.inference_mode(), _batch_attention(self.model):
            tokens = torch.tensor([[s.ids[-1]] for s in self.rows])
            positions = torch.tensor([[s.length - 1] for s in self.rows])
            length = int(positions.max()) + 1
            mask = (self.positions[:length].unsqueeze(0) <= positions).view(n, 1, 1, length)
            if self.backend:
                self._mark_dynamic(n, tokens, positions, mask)
            logits = self._step(self.model, tokens, positions, mask, self.kv)
        self.steps += 1
        done = []
        for i, seq in enumerate(self.rows):
            seq.choose(logits[i : i + 1])
            if seq.stop_reason is None and should_stop is not None and should_stop(seq):
                seq.stop_reason = "cancelled"
            if seq.stop_reason is not None:
                done.append(seq)
        for seq in done:
            self._retire(self.rows.index(seq))
        return done

    def cancel(self, seq: BatchSequence) -> None:
        """End an active sequence now (``stop_reason`` ``"cancelled"``)."""
        seq.stop_reason = "cancelled"
        self._retire(self.rows.index(seq))

    def run(self) -> None:
        """Step until no sequence is active."""
        while self.rows:
            self.step()

    # ---------------------------------------------------------------- inner

    def _new_sequence(self, prompt, max_new_tokens, stream, stop_at_eos, tag, sampling):
        """``(BatchSequence, prompt ids [1, T])``, the request checked as ``generate``
        checks it."""
        model = self.model
        params, max_new_tokens = _checked_request(
            model, self.tokenizer, "exact", max_new_tokens, None, stream, sampling
        )
        ids = _prompt_ids(self.tokenizer, prompt)
        need = ids.shape[1] + max_new_tokens
        if need > self.max_len:
            raise ValueError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                f"tokens do not fit the batch cache (max_len={self.max_len})"
            )
        chooser = None if params.greedy_argmax else sampling_mod.TokenChooser(params, ids)
        seq = BatchSequence(
            prompt_len=ids.shape[1],
            max_new_tokens=max_new_tokens,
            eos=_eos_ids(model, self.tokenizer) if stop_at_eos else set(),
            watch=_StopWatch(self.tokenizer, params, stream, None),
            chooser=chooser,
            tag=tag,
        )
        return seq, ids

    def _retire(self, i: int) -> None:
        """Free row ``i``: the last row moves into it (the active rows stay 0..n-1)."""
        seq = self.rows[i]
        last = len(self.rows) - 1
        if i != last:
            self.kv.move(last, i, self.rows[last].length)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        seq.finish(self.max_len, self.backend)

    def _mark_dynamic(self, n, tokens, positions, mask) -> None:
        # One graph for every batch size >= 2 and every length >= 2 (batch size 1 and
        # length 1 are specialised by dynamo: one graph more each, at most).
        if n >= 2:
            for t in (tokens, positions, mask):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=self.slots)
        if mask.shape[-1] >= 2:
            torch._dynamo.mark_dynamic(mask, 3, min=2, max=self.max_len)


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    max_new_tokens: int | None = None,
    *,
    slots: int = DEFAULT_SLOTS,
    max_len: int | None = None,
    compile: bool | str = True,
    stop_at_eos: bool = True,
    **sampling,
) -> list[Generation]:
    """Decode ``prompts`` together, at most ``slots`` at a time (continuous batching: a
    waiting prompt joins as soon as a sequence ends); one ``Generation`` per prompt,
    in order. Sampling options as in ``sparamx.generate`` (the same for every prompt;
    a ``seed`` seeds each sequence's own generator)."""
    if isinstance(prompts, (str, torch.Tensor)):
        raise TypeError("prompts must be a sequence of prompts (for one, use sparamx.generate)")
    if not prompts:
        return []
    dec = BatchDecoder(model, tokenizer, slots=slots, max_len=max_len, compile=compile)
    seqs: list[BatchSequence | None] = [None] * len(prompts)
    pending = list(enumerate(prompts))
    while pending or dec.active:
        while pending and dec.free:
            i, prompt = pending.pop(0)
            seqs[i] = dec.add(prompt, max_new_tokens, stop_at_eos=stop_at_eos, **sampling)
        dec.step()
    return [s.result for s in seqs]
