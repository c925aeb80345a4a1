"""The sparse KV cache with static shapes, for the lean decode loop
(``sparamx.generate(..., kv=KVSettings(...))``).

``kv.SparseKVCache`` grows its window with ``torch.cat`` and compresses blocks inside
the attention call: right for ``model.generate``, but a compiled decode step would see a
new shape and a new Python count on every token (a recompile per token). This cache
holds the same data in buffers allocated once:

- per layer, the compressed arrays (values, bitmaps, key fill) for ``max_len`` tokens
  and a dense window buffer of ``sink_tokens + recent_window + block_tokens`` tokens;
- the counts (compressed tokens, window tokens) are Python ints kept outside the
  compiled step. The step gets them as the lengths of two small tensors marked dynamic
  (``kv_positions``: all cached tokens, ``kv_window``: the window's), so one graph
  serves every length: it writes the new token's K/V into the window buffer at
  ``len(kv_window) - 1`` and runs ``sparamx::kv_decode_attention`` over the first
  ``len(kv_positions) - len(kv_window)`` compressed tokens plus the window;
- between steps ``advance`` counts the token and, once a whole block has left the
  recent window, prunes and packs it (eagerly, once per ``block_tokens`` tokens) and
  shifts the rest of the window down.

Prefill runs eagerly through ``kv.sparse_kv_attention``, as ``model.generate`` with a
``SparseKVCache`` does, and ``begin_decode`` then moves the window into its buffer.
The pruning code, the compaction schedule and the kernel's inputs are those of
``SparseKVCache`` (this layer subclasses its layer), so greedy tokens equal
``model.generate``'s with the sparse cache (tests).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from . import kv

STATIC_ATTENTION = "sparamx_kv_static"
KERNEL_MAX_HEAD_DIM = 256  # sparamx/csrc/attention_ops.cpp: kMaxHeadDim


@torch.library.custom_op("sparamx_lean::kv_step_attention", mutates_args=())
def kv_step_attention(
    q: torch.Tensor,
    k_vals: torch.Tensor,
    k_bits: torch.Tensor | None,
    v_vals: torch.Tensor,
    v_bits: torch.Tensor | None,
    n_comp: int,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    scale: float,
    mask_tokens: int,
    k_fill: torch.Tensor | None,
) -> torch.Tensor:
    """``kv.decode_attention`` behind a schema whose ``n_comp`` is a ``SymInt``: for a
    native build that declares it ``int`` (a compiled step would specialise on every
    compressed length). The inferred schema of a Python custom op takes a symbolic
    int; the call costs a Python frame per layer, which the native ``SymInt`` schema
    avoids (``STEP_ATTENTION``)."""
    return kv.decode_attention(
        q, k_vals, k_bits, v_vals, v_bits, n_comp, k_win, v_win, scale, None, mask_tokens, k_fill
    )


@kv_step_attention.register_fake
def _(q, *args):
    return q.new_empty(q.shape)


def _native_step(q, k_vals, k_bits, v_vals, v_bits, n_comp, k_win, v_win, scale, mask, k_fill):
    return kv.decode_attention(
        q, k_vals, k_bits, v_vals, v_bits, n_comp, k_win, v_win, scale, None, mask, k_fill
    )


def _symint_schema() -> bool:
    return "SymInt n_comp" in str(torch.ops.sparamx.kv_decode_attention.default._schema)


# The decode-attention call of ``attend_step``: the native op directly when its schema
# takes ``n_comp`` as a ``SymInt``, else through ``kv_step_attention``.
STEP_ATTENTION = _native_step if _symint_schema() else kv_step_attention


class StaticSparseKVLayer(kv.SparseKVLayer):
    """One decoder layer of ``StaticSparseKVCache``: ``SparseKVLayer``'s compressed
    tokens in arrays preallocated for ``max_len`` tokens, and its window in a buffer
    (``k_buf``/``v_buf``, first ``n_win`` tokens) once decoding starts."""

    def __init__(self, settings: kv.KVSettings, max_len: int):
        self.max_len = max_len
        super().__init__(settings)
        self.n_win = 0
        self.decoding = False  # after begin_decode: the window lives in k_buf / v_buf
        self.k_buf = self.v_buf = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h, d = self.shape
        s = self.settings
        # The window holds at most sinks + recent + one block; one slot more, so that a
        # window view is never the whole buffer (dynamo would guard on that, contiguity)
        win = s.sink_tokens + s.recent_window + s.block_tokens + 1
        self.k_buf = key_states.new_zeros(b, h, win, d)
        self.v_buf = value_states.new_zeros(b, h, win, d)
        self._allocate(-(-self.max_len // s.block_tokens) * s.block_tokens)

    def _allocate(self, cap: int) -> None:
        """Compressed arrays for ``cap`` tokens, the shapes ``SparseKVLayer._append``
        grows to (it then never grows them)."""
        b, h, d = self.shape
        g, w = self.mask_tokens, kv.words_for(d)

        def zeros(rows, last, dtype):
            return torch.zeros(b, h, rows, last, dtype=dtype, device=self.device)

        self.k_vals = zeros(cap, self.keep_k, torch.bfloat16)
        self.v_vals = zeros(cap, self.keep_v, torch.bfloat16)
        # kv.prune_tokens leaves out the bitmap only for a whole side with a mask per token
        if self.keep_k < d or g > 1:
            self.k_bits = zeros(cap // g, w, torch.int32)
        if self.keep_v < d or g > 1:
            self.v_bits = zeros(cap // g, w, torch.int32)
        if self._fills_keys():
            self.k_fill = zeros(cap // g, 32 * w, torch.bfloat16)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.decoding:  # prefill: SparseKVLayer's window (kv.sparse_kv_attention)
            return super().update(key_states, value_states, *args, **kwargs)
        # Decode: the attention function writes the token into the window buffer (it
        # knows the window's length); the cache hands the new token through.
        return key_states, value_states

    def begin_decode(self) -> None:
        """After prefill: move the window into its buffer; from now on, static shapes."""
        n = self.keys.shape[-2]
        self.k_buf[:, :, :n] = self.keys
        self.v_buf[:, :, :n] = self.values
        self.n_win, self.decoding = n, True

    def attend_step(self, q, k_new, v_new, n_comp, n_win: int, scale: float) -> torch.Tensor:
        """Decode attention of ``q[B, Hq, D]`` after writing the new token's
        ``k_new, v_new[B, Hkv, 1, D]`` as window token ``n_win - 1``; ``n_comp`` and
        ``n_win`` may be symbolic sizes (compiled step)."""
        self.k_buf[:, :, n_win - 1 : n_win].copy_(k_new)
        self.v_buf[:, :, n_win - 1 : n_win].copy_(v_new)
        k_win, v_win = self.k_buf[:, :, :n_win], self.v_buf[:, :, :n_win]
        if k_win.dtype != torch.bfloat16:  # fp32 models: the kernel reads bf16
            k_win, v_win = k_win.to(torch.bfloat16), v_win.to(torch.bfloat16)
        args = (self.k_vals, self.k_bits, self.v_vals, self.v_bits, n_comp, k_win, v_win)
        return STEP_ATTENTION(q, *args, scale, self.mask_tokens, self.k_fill)

    def advance(self) -> None:
        """After a decode step (eager): count its token; compress the blocks that left
        the recent window, as ``SparseKVLayer.compact`` does after attending."""
        self.cumulative_length += 1
        self.n_win += 1
        s0, n = self._blocks_to_compress(self.n_win)
        if not n:
            return
        self._compress(self.k_buf[:, :, s0 : s0 + n], self.v_buf[:, :, s0 : s0 + n])
        rest = self.n_win - s0 - n
        # clone: source and destination overlap when the rest is longer than a block
        self.k_buf[:, :, s0 : s0 + rest] = self.k_buf[:, :, s0 + n : self.n_win].clone()
        self.v_buf[:, :, s0 : s0 + rest] = self.v_buf[:, :, s0 + n : self.n_win].clone()
        self.n_win -= n

    # The traced step must not read the Python counts (a guard that fails every token):
    # there the mask sizes are constants. The decode mask is not used (batch 1, one query
    # token attends to every cached token).
    def get_seq_length(self) -> int:
        return 0 if torch.compiler.is_compiling() else self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling():
            return self.max_len, 0
        return super().get_mask_sizes(query_length)

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (and the compiled step's shapes)."""
        self.cumulative_length = self.n_comp = self.n_win = 0
        self.q_sq, self.decoding = None, False
        if self.is_initialized:
            self.keys, self.values = self.k_buf[:, :, :0], self.v_buf[:, :, :0]

    def nbytes(self) -> int:
        """Bytes of cached data, as ``SparseKVLayer.nbytes`` counts them (preallocated
        spare capacity not counted)."""
        if not self.decoding:
            return super().nbytes()
        return self._compressed_nbytes() + 2 * self.k_buf[:, :, : self.n_win].nbytes


class StaticSparseKVCache(kv.SparseKVCache):
    """A ``SparseKVCache`` of ``StaticSparseKVLayer``s for ``max_len`` tokens, one per
    decoder layer of ``config``; its attention is ``"sparamx_kv_static"``."""

    def __init__(self, settings: kv.KVSettings, config, max_len: int):
        check_model(config, settings)
        self.settings, self.max_len = settings, max_len
        n = config.get_text_config().num_hidden_layers
        Cache.__init__(self, layers=[StaticSparseKVLayer(settings, max_len) for _ in range(n)])
        s = settings
        self.window_ids = torch.arange(s.sink_tokens + s.recent_window + s.block_tokens)
        self.positions = torch.arange(max_len)

    @property
    def length(self) -> int:
        return self.layers[0].cumulative_length

    def begin_decode(self) -> None:
        for layer in self.layers:
            layer.begin_decode()

    def step_inputs(self, dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_positions, kv_window)`` for the next step: views whose lengths are the
        cached tokens and the window's tokens once the step's token is in. Under compile
        both lengths are symbolic sizes (one graph for every length)."""
        n_win = self.layers[0].n_win + 1
        pos, win = self.positions[: self.length + 1], self.window_ids[:n_win]
        if dynamic:
            torch._dynamo.mark_dynamic(pos, 0, min=2, max=self.max_len)
            if n_win >= 2:  # a one-token window (no sinks, no recent window) specialises
                torch._dynamo.mark_dynamic(win, 0, min=2, max=self.window_ids.shape[0])
        return pos, win

    def advance(self) -> None:
        for layer in self.layers:
            layer.advance()


def check_model(config, settings: kv.KVSettings) -> None:
    """Refuse models whose attention the sparse decode kernel does not compute, naming
    the setting; a clear error here instead of a wrong answer in the loop."""
    text = config.get_text_config()
    d = kv.cache_dims(config)[2]
    if d > KERNEL_MAX_HEAD_DIM:
        raise ValueError(
            f"kv: head_dim {d} is larger than the sparse decode kernel's {KERNEL_MAX_HEAD_DIM}; "
            f"use generate(..., kv=False) (the dense static cache)"
        )
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            "kv: attention logit soft-capping (attn_logit_softcapping) is not computed by "
            "the sparse decode kernel; use generate(..., kv=False)"
        )
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        raise ValueError(
            "kv: sliding-window attention layers (layer_types) are not served by the sparse "
            "KV cache; use generate(..., kv=False)"
        )


def static_kv_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers attention function ``"sparamx_kv_static"``: a decode step of the lean
    loop (``kw`` has ``sparamx_kv``, the cache, and the ``kv_positions`` / ``kv_window``
    lengths) runs ``StaticSparseKVLayer.attend_step``; anything else (prefill) is
    ``kv.sparse_kv_attention``, as under ``model.generate``."""
    cache = kw.get("sparamx_kv")
    if cache is None or query.shape[2] != 1:
        return kv.sparse_kv_attention(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kw.get(name) is not None:
            raise ValueError(f"kv: attention with {name} is not served by the sparse decode kernel")
    window = kw.get("sliding_window") or 0
    if window and window < cache.max_len:
        raise ValueError(
            f"kv: sliding-window attention ({window} tokens, cache {cache.max_len}) is not "
            f"served by the sparse decode kernel; use generate(..., kv=False)"
        )
    layer = cache.layers[module.layer_idx]
    n_win = kw["kv_window"].shape[0]
    n_comp = kw["kv_positions"].shape[0] - n_win
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend_step(query[:, :, 0], key, value, n_comp, n_win, scale)
    return out.unsqueeze(1).to(query.dtype), None  # [B, 1, Hq, D]


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    kv.register()  # prefill goes through "sparamx_kv"'s function
    AttentionInterface.register(STATIC_ATTENTION, static_kv_attention)
    AttentionMaskInterface.register(STATIC_ATTENTION, sdpa_mask)
