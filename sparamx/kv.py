"""Sparse KV cache: run-time pruning of keys (after RoPE) and values, a compressed cache
that stock transformers modeling code can use, and the decode attention that reads it.

Pieces, from the bottom up:

- ``prune_tokens`` / ``unpack_tokens``: per KV head, keep ``keep`` entries of head_dim
  (magnitude, or a caller-given score such as Wanda's |k_j|·‖q_j‖) and pack them as
  bitmap words (uint32 per 32 dims) plus the kept bf16 values. One mask per token
  (``mask_tokens=1``; values in dimension order) or one per group of ``mask_tokens=16``
  consecutive tokens, chosen by the group's summed scores (values in per-block layouts
  made for the kernel's two products, ``to_blocks``). Every token keeps the same count, so
  token t's values start at ``t * keep``: no offsets table, and no address in the
  kernel depends on another token's popcount.
- ``SparseKVLayer`` (a transformers ``CacheLayerMixin``): a dense window and, behind it,
  the compressed tokens. The window holds the first ``sink_tokens`` tokens (attention
  sinks) and the newest ``recent_window``; whole blocks of ``block_tokens`` tokens
  between them leave it, pruned and packed. ``nbytes`` counts every byte kept.
- ``SparseKVCache`` (a transformers ``Cache``): one layer per decoder layer.
- ``sparse_kv_attention``: registered in transformers' attention-function registry as
  ``"sparamx_kv"``. The cache's ``update`` returns the dense window with a reference to its
  layer; for a one-token query this function hands the compressed tokens and the window
  to ``torch.ops.sparamx.kv_decode_attention`` (``sparamx/csrc/attention_*.cpp``), which
  reads each compressed block once per KV head for all query heads of its GQA group.
  Prefill stays dense (SDPA over the decompressed cache when it has compressed tokens).
- ``enable_sparse_kv(model, settings)``: switch a model to the sparse cache, so that
  ``model.generate`` uses it without further arguments.

With both sparsities 0 the compressed tokens are stored dense (no bitmap, whatever
``mask_tokens``) and the same kernel runs as our dense-cache decode attention.

Why shared masks (``mask_tokens=16``, the default): with a mask per token the kernel
expands every token's row to full width before multiplying, so it does the dense
kernel's arithmetic plus the expands whatever the sparsity. With one mask per 16 tokens
the query is compressed once per group and the kernel multiplies only the kept entries:
work shrinks with sparsity (at 50%, 1.5-1.9x our dense kernel), at some cost in
accuracy. Two things narrow that cost: the attention-sink tokens stay dense
(``sink_tokens``), and pruned key entries read as their group's mean instead of zero
(``k_fill="mean"``, ``group_fill``): keys carry per-channel offsets that a shared mask
would otherwise drop for all 16 tokens. The fill is one bf16 row per group (~6% more
memory at 50%) and adds q·fill to the group's 16 scores (one dot product per group and
query head). On SmolLM2 at 50% (README, "Sparse KV cache") this takes the decode-path
perplexity cost from +4.6% / +6.1% (magnitude / Wanda-style, 768 tokens) to +3.4% /
+4.1%; per-token masks: +2.3% / +1.2%. (The same mean for values helped neither method
reliably and would cost a vector update per group and head: not done.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops  # noqa: F401  (loads sparamx._C, which registers the op)

ATTENTION_NAME = "sparamx_kv"
KV_METHODS = ("none", "magnitude", "wanda")
BLOCK_TOKENS = 32  # tokens per compressed block (leave the window together)
MASK_TOKENS = (1, 16)  # tokens per pruning mask the kernels take (16: their token block)
K_FILLS = ("mean", "zero")  # what pruned key entries read as with shared masks


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class KVSettings:
    """Sparse KV cache settings (the config's ``kv`` section)."""

    method: str = "magnitude"  # magnitude | wanda; "none" = our dense cache (no pruning)
    k_sparsity: float = 0.5  # share of head_dim dropped per key (0 <= s < 1)
    v_sparsity: float = 0.5
    recent_window: int = 64  # newest tokens kept dense
    sink_tokens: int = 32  # first tokens kept dense (attention sinks)
    mask_tokens: int = 16  # tokens sharing one pruning mask: 16 or 1 (see the docstring)
    block_tokens: int = BLOCK_TOKENS
    # shared masks: pruned key entries read as their group's mean ("mean", stored once
    # per 16 tokens) or as zero; see the docstring
    k_fill: str = "mean"

    def __post_init__(self):
        if self.method not in KV_METHODS:
            raise ValueError(f"kv.method: {self.method!r} is not one of {', '.join(KV_METHODS)}")
        for name in ("k_sparsity", "v_sparsity"):
            s = getattr(self, name)
            if not isinstance(s, int | float) or not 0.0 <= s < 1.0:
                raise ValueError(f"kv.{name}: {s!r} is invalid; allowed: 0 <= sparsity < 1")
        if not isinstance(self.recent_window, int) or self.recent_window < 0:
            raise ValueError(f"kv.recent_window: {self.recent_window!r} is invalid; must be >= 0")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"kv.sink_tokens: {self.sink_tokens!r} is invalid; must be >= 0")
        if self.mask_tokens not in MASK_TOKENS:
            raise ValueError(
                f"kv.mask_tokens: {self.mask_tokens!r} is invalid; allowed: "
                f"{' or '.join(map(str, MASK_TOKENS))}"
            )
        if self.k_fill not in K_FILLS:
            raise ValueError(
                f"kv.k_fill: {self.k_fill!r} is invalid; allowed: {' or '.join(K_FILLS)}"
            )
        if not isinstance(self.block_tokens, int) or self.block_tokens < 1:
            raise ValueError(f"kv.block_tokens: {self.block_tokens!r} is invalid; must be >= 1")
        if self.block_tokens % self.mask_tokens:
            raise ValueError(
                f"kv.block_tokens: {self.block_tokens} is invalid; must be a multiple of "
                f"kv.mask_tokens ({self.mask_tokens})"
            )

    @classmethod
    def from_dict(cls, d: dict) -> KVSettings:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"kv: unknown field(s) {unknown}; allowed: {list(known) or ''}")
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)

    def keep(self, head_dim: int, sparsity: float) -> int:
        """Entries kept per token: round((1 - s) * head_dim), at least one."""
        if self.method == "none":
            return head_dim
        return max(1, min(head_dim, round((1.0 - sparsity) * head_dim)))


# ------------------------------------------------------------------------ packing


def words_for(head_dim: int) -> int:
    return (head_dim + 31) // 32


def cache_dims(config) -> tuple[int, int, int]:
    """(decoder layers, KV heads, head_dim) of a transformers config: the shape of its
    KV cache per token."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers, heads, d


def _check_side(group: int, side: str | None, fn: str) -> None:
    if group > 1 and side not in ("k", "v"):
        raise ValueError(
            f"{fn}: side must be 'k' or 'v' with group={group} (keys and values have "
            f"different block layouts), got {side!r}"
        )


def prune_tokens(
    x: torch.Tensor,
    keep: int,
    score: torch.Tensor | None = None,
    group: int = 1,
    side: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Keep the ``keep`` highest-scoring entries of each row of ``x[..., n, D]`` (score
    default |x|), one choice per ``group`` consecutive rows (scores summed over the
    group; ``n`` a multiple of it). Returns ``(bits[..., n / group, W] int32,
    values[..., n, keep] bf16)`` as the kernels read them: with ``group=1`` values in
    dimension order, and ``bits`` None when every entry is kept (the dense layout); with
    ``group=16`` bitmaps always (full when every entry is kept) and values in the block
    layout of ``side`` ("k" or "v", see ``to_blocks``)."""
    d = x.shape[-1]
    _check_side(group, side, "prune_tokens")
    if keep >= d and group == 1:
        return None, x.to(torch.bfloat16).contiguous()
    keep = min(keep, d)
    s = x.float().abs() if score is None else score.float()
    if group > 1:
        *lead, n, _ = s.shape
        if n % group:
            raise ValueError(f"prune_tokens: {n} tokens are not whole groups of {group}")
        s = s.reshape(*lead, n // group, group, d).sum(-2)
    idx = s.topk(keep, dim=-1).indices.sort(dim=-1).values  # [..., keep], dimension order
    rows = idx.repeat_interleave(group, dim=-2) if group > 1 else idx
    values = x.gather(-1, rows).to(torch.bfloat16)
    w = words_for(d)
    mask = torch.zeros(*idx.shape[:-1], w * 32, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, idx, True)
    shifts = torch.arange(32, device=x.device, dtype=torch.int64)
    bits = (mask.view(*idx.shape[:-1], w, 32).long() << shifts).sum(-1)  # [0, 2^32)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # as int32 bits
    if group > 1:
        values = to_blocks(values, side)
    return bits.contiguous(), values.contiguous()


def to_blocks(values: torch.Tensor, side: str) -> torch.Tensor:
    """Token-order kept values ``[..., n, keep]`` (n a multiple of 16) -> the kernels'
    layouts for masks shared by 16 tokens: the same shape, each block of 16 tokens'
    values reordered. Keys (``side="k"``) transposed in kept-dimension pairs,
    ``[pair][token][2]``, an odd last dimension as ``[token]``; values (``side="v"``)
    in token pairs, ``[token pair][dim][2]`` (see sparamx/csrc/attention.h)."""
    *lead, n, keep = values.shape
    x = values.reshape(*lead, n // 16, 16, keep)
    if side == "v":
        out = x.reshape(*lead, n // 16, 8, 2, keep).transpose(-2, -1)
    else:
        p = keep // 2
        pairs = x[..., : 2 * p].reshape(*lead, n // 16, 16, p, 2).transpose(-3, -2)
        last = x[..., 2 * p :].transpose(-2, -1)  # [..., keep % 2, 16]
        out = torch.cat([pairs.flatten(-3), last.flatten(-2)], -1)
    return out.reshape(*lead, n, keep).contiguous()


def from_blocks(values: torch.Tensor, side: str) -> torch.Tensor:
    """Inverse of ``to_blocks``: token-order values ``[..., n, keep]``."""
    *lead, n, keep = values.shape
    x = values.reshape(*lead, n // 16, 16 * keep)
    if side == "v":
        out = x.reshape(*lead, n // 16, 8, keep, 2).transpose(-2, -1)
    else:
        p = keep // 2
        pairs = x[..., : 32 * p].reshape(*lead, n // 16, p, 16, 2).transpose(-3, -2)
        last = x[..., 32 * p :].reshape(*lead, n // 16, keep - 2 * p, 16).transpose(-2, -1)
        out = torch.cat([pairs.flatten(-2), last], -1)
    return out.reshape(*lead, n, keep).contiguous()


def group_fill(x: torch.Tensor, bits: torch.Tensor, group: int) -> torch.Tensor:
    """The mean of each group's pruned entries: ``x[..., n, D]`` and its shared masks
    ``bits[..., n / group, W]`` -> ``[..., n / group, 32 W]`` bf16, the mean over the
    group's tokens of every pruned dimension, zero at kept dimensions (and the padding
    up to 32 W, the width the kernels read)."""
    *lead, n, d = x.shape
    mask = token_mask(bits, d)  # [..., n / group, D]
    mean = x.float().reshape(*lead, n // group, group, d).mean(-2)
    fill = torch.zeros(*mask.shape[:-1], bits.shape[-1] * 32, dtype=torch.bfloat16, device=x.device)
    fill[..., :d] = torch.where(mask, 0.0, mean).to(torch.bfloat16)
    return fill


def token_mask(bits: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Bitmap words ``[..., W]`` -> kept-entry mask ``[..., head_dim]`` (bool)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    m = ((bits.long() & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 1
    return m.bool().flatten(-2)[..., :head_dim]


def unpack_tokens(
    bits: torch.Tensor | None,
    values: torch.Tensor,
    head_dim: int,
    group: int = 1,
    side: str | None = None,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of ``prune_tokens`` (same ``group`` and ``side``): dense bf16
    ``[..., n, head_dim]`` with zeros where pruned, or the group's ``fill`` (from
    ``group_fill``) when given."""
    if bits is None:
        return values
    _check_side(group, side, "unpack_tokens")
    if group > 1:
        values = from_blocks(values, side)
        bits = bits.repeat_interleave(group, dim=-2)
    mask = token_mask(bits, head_dim)
    if fill is None:
        out = torch.zeros(*mask.shape, dtype=values.dtype, device=values.device)
    else:
        out = fill[..., :head_dim].repeat_interleave(group, dim=-2).to(values.dtype)
    out[mask] = values.flatten()  # row-major order = each row's dims in order
    return out


# ------------------------------------------------------------------------ kernels


def decode_attention(
    q: torch.Tensor,
    k_vals: torch.Tensor,
    k_bits: torch.Tensor | None,
    v_vals: torch.Tensor,
    v_bits: torch.Tensor | None,
    n_comp: int,
    k_win: torch.Tensor,
    v_win: torch.Tensor,
    scale: float,
    kernel: str | None = None,
    mask_tokens: int = 1,
    k_fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V for one query token per sequence: ``q[B, Hq, D]`` over the
    first ``n_comp`` compressed tokens (``*_vals[B, Hkv, cap, keep]``, ``*_bits[B, Hkv,
    cap / mask_tokens, W]`` or None for dense; with shared masks optionally ``k_fill[B,
    Hkv, cap / 16, 32 W]``, what pruned key entries read as) and the window ``*_win[B,
    Hkv, n_win, D]``. Returns ``[B, Hq, D]``."""
    return torch.ops.sparamx.kv_decode_attention(
        q,
        k_vals,
        k_bits,
        v_vals,
        v_bits,
        n_comp,
        k_win,
        v_win,
        float(scale),
        kernel,
        mask_tokens,
        k_fill,
    )


@torch.library.register_fake("sparamx::kv_decode_attention")
def _(q, *args, **kwargs):  # the output has q's shape and dtype, whatever the cache
    torch._check(q.dim() == 3)
    return q.new_empty(q.shape)


def reference_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Pure-PyTorch reference: ``q[B, Hq, D]`` (rounded to bf16, as the kernels do) over
    dense ``k, v[B, Hkv, n, D]`` in fp32; GQA by repeating KV heads. Returns fp32."""
    group = q.shape[1] // k.shape[1]
    qf = q.to(torch.bfloat16).float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", qf, kf) * scale
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vf)


# ------------------------------------------------------------------------ cache


class SparseKVLayer(CacheLayerMixin):
    """One decoder layer's cache: compressed tokens ``[0, n_comp)`` and a dense window
    ``self.keys/self.values[B, Hkv, n_win, D]`` (the model's dtype) behind them."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, settings: KVSettings):
        super().__init__()
        self.settings = settings
        self.cumulative_length = 0
        self.n_comp = 0
        self.k_vals = self.k_bits = self.v_vals = self.v_bits = None
        self.k_fill = None  # shared masks, k_fill "mean": [B, Hkv, cap / 16, 32 W] bf16
        self.q_sq = None  # Wanda: sum over prefill tokens of q² per KV head group [Hkv, D]
        self.v_col = None  # Wanda: o_proj column norms per value channel [Hkv, D]

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        b, h, _, d = key_states.shape
        self.shape = (b, h, d)
        self.keep_k = self.settings.keep(d, self.settings.k_sparsity)
        self.keep_v = self.settings.keep(d, self.settings.v_sparsity)
        # tokens per mask; nothing pruned: our dense cache (no bitmaps, row layout)
        pruned = min(self.keep_k, self.keep_v) < d
        self.mask_tokens = self.settings.mask_tokens if pruned else 1
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        # The window goes back with a reference to this layer: sparse_kv_attention reads
        # the compressed tokens through it (and prunes after attending). While nothing is
        # compressed the window is the whole cache, so any attention function is right.
        keys = self.keys.view_as(self.keys)
        keys._sparamx_kv_layer = self
        return keys, self.values

    # Shapes transformers' mask code asks for.
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.settings)

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("sparamx sparse KV cache: beam search is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("sparamx sparse KV cache: cropping is not supported")

    # --- pruning and compaction

    def observe_queries(self, query: torch.Tensor) -> None:
        """Wanda-style scores need ‖q_j‖ per KV head: sum q² over the prefill tokens and
        the query heads of each group. ``query[B, Hq, q_len, D]``."""
        b, hq, _, d = query.shape
        h = self.shape[1]
        sq = query.float().pow(2).view(b, h, hq // h, -1, d).sum(dim=(0, 2, 3))  # [Hkv, D]
        self.q_sq = sq if self.q_sq is None else self.q_sq + sq

    def _sinks(self) -> int:
        """Sink tokens at the front of the window (the sequence's first tokens)."""
        return min(self.settings.sink_tokens, self.keys.shape[-2])

    def compact(self) -> None:
        """Move whole blocks between the sinks and the newest ``recent_window`` tokens out
        of the window: prune and pack. (Decode attention does not care about token
        order, so the window keeps the sinks in front of the newest tokens.)"""
        s0, n = self._blocks_to_compress(self.keys.shape[-2])
        if not n:
            return
        self._compress(self.keys[:, :, s0 : s0 + n], self.values[:, :, s0 : s0 + n])
        self.keys = torch.cat([self.keys[:, :, :s0], self.keys[:, :, s0 + n :]], dim=-2)
        self.values = torch.cat([self.values[:, :, :s0], self.values[:, :, s0 + n :]], dim=-2)

    def _blocks_to_compress(self, n_win: int) -> tuple[int, int]:
        """(sinks at the window's front, tokens after them to compress now) for a window
        of ``n_win`` tokens: whole ``block_tokens`` blocks beyond the recent window."""
        bt = self.settings.block_tokens
        s0 = min(self.settings.sink_tokens, n_win)
        blocks = (n_win - s0 - self.settings.recent_window) // bt
        return s0, max(blocks, 0) * bt

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prune and pack the window tokens ``k, v[B, Hkv, n, D]`` (whole blocks, oldest
        first) behind the compressed ones."""
        k_score = v_score = None
        if self.settings.method == "wanda" and self.q_sq is not None:
            # |k_j| · ‖q_j‖ (per KV head, channel j)
            k_score = k.float().abs() * self.q_sq.sqrt()[None, :, None, :]
        if self.settings.method == "wanda" and self.v_col is not None:
            # |v_j| · ‖W_o columns fed by channel j‖: how far dropping v_j moves the output
            v_score = v.float().abs() * self.v_col[None, :, None, :]
        g = self.mask_tokens
        kb, kv_ = prune_tokens(k, self.keep_k, k_score, g, "k")
        vb, vv = prune_tokens(v, self.keep_v, v_score, g, "v")
        kf = group_fill(k, kb, g) if self._fills_keys() else None
        self._append(kb, kv_, vb, vv, k.shape[-2], kf)

    def _fills_keys(self) -> bool:
        return (
            self.mask_tokens > 1 and self.settings.k_fill == "mean" and self.keep_k < self.shape[2]
        )

    def _append(self, kb, kv_, vb, vv, n, kf=None):
        b, h, d = self.shape
        g = self.mask_tokens  # tokens per bitmap row; divides n_comp, n and cap
        need = self.n_comp + n
        cap = 0 if self.k_vals is None else self.k_vals.shape[2]
        if need > cap:  # grow by doubling: amortised O(1) copies per token
            new_cap = max(need, 2 * cap, 256)

            def grow(t, last, dtype, per=1):  # per: tokens per row (bitmaps: mask_tokens)
                out = torch.zeros(b, h, new_cap // per, last, dtype=dtype, device=self.device)
                if t is not None:
                    out[:, :, : self.n_comp // per] = t[:, :, : self.n_comp // per]
                return out

            w = words_for(d)
            self.k_vals = grow(self.k_vals, self.keep_k, torch.bfloat16)
            self.v_vals = grow(self.v_vals, self.keep_v, torch.bfloat16)
            if kb is not None:
                self.k_bits = grow(self.k_bits, w, torch.int32, g)
            if vb is not None:
                self.v_bits = grow(self.v_bits, w, torch.int32, g)
            if kf is not None:
                self.k_fill = grow(self.k_fill, 32 * w, torch.bfloat16, g)
        sl = slice(self.n_comp, need)
        bsl = slice(self.n_comp // g, need // g)
        self.k_vals[:, :, sl] = kv_
        self.v_vals[:, :, sl] = vv
        if kb is not None:
            self.k_bits[:, :, bsl] = kb
        if vb is not None:
            self.v_bits[:, :, bsl] = vb
        if kf is not None:
            self.k_fill[:, :, bsl] = kf
        self.n_comp = need

    # --- reading

    def dense_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached tokens as dense ``[B, Hkv, n, D]`` in the window's dtype (pruned
        entries zero): what the kernel attends over; for prefill after compaction."""
        if not self.n_comp:
            return self.keys, self.values
        d, g, s0 = self.shape[2], self.mask_tokens, self._sinks()
        sl, bsl = slice(0, self.n_comp), slice(0, self.n_comp // g)
        kb = None if self.k_bits is None else self.k_bits[:, :, bsl]
        vb = None if self.v_bits is None else self.v_bits[:, :, bsl]
        kf = None if self.k_fill is None else self.k_fill[:, :, bsl]
        k = unpack_tokens(kb, self.k_vals[:, :, sl], d, g, "k", kf).to(self.dtype)
        v = unpack_tokens(vb, self.v_vals[:, :, sl], d, g, "v").to(self.dtype)
        # token order: sinks, compressed, newest
        k = torch.cat([self.keys[:, :, :s0], k, self.keys[:, :, s0:]], dim=-2)
        v = torch.cat([self.values[:, :, :s0], v, self.values[:, :, s0:]], dim=-2)
        return k, v

    def attend(self, q: torch.Tensor, scale: float, kernel: str | None = None) -> torch.Tensor:
        """Decode attention of ``q[B, Hq, D]`` over this layer's cache."""
        b, h, d = self.shape
        k_win, v_win = self.keys, self.values
        if k_win.dtype != torch.bfloat16:  # fp32 models: the kernel reads bf16
            k_win, v_win = k_win.to(torch.bfloat16), v_win.to(torch.bfloat16)
        if self.n_comp:
            kv, kb, vv, vb, kf = self.k_vals, self.k_bits, self.v_vals, self.v_bits, self.k_fill
        else:
            kv = vv = k_win[:, :, :0].new_empty(b, h, 0, d)
            kb = vb = kf = None
        return decode_attention(
            q, kv, kb, vv, vb, self.n_comp, k_win, v_win, scale, kernel, self.mask_tokens, kf
        )

    def nbytes(self) -> int:
        """Bytes of cached data: compressed values and bitmaps of the ``n_comp`` tokens
        plus the dense window (allocated spare capacity not counted)."""
        if not self.is_initialized:
            return 0
        return self._compressed_nbytes() + self.keys.numel() * self.keys.element_size() * 2

    def _compressed_nbytes(self) -> int:
        b, h, d = self.shape
        values = 2 * (self.keep_k + self.keep_v) * self.n_comp
        masks = (self.k_bits is not None) + (self.v_bits is not None)
        groups = self.n_comp // self.mask_tokens
        bitmaps = 4 * words_for(d) * masks * groups
        fills = 0 if self.k_fill is None else 2 * self.k_fill.shape[-1] * groups
        return b * h * (values + bitmaps + fills)

    def dense_nbytes(self) -> int:
        """Bytes the same tokens take in a dense bf16 cache."""
        if not self.is_initialized:
            return 0
        b, h, d = self.shape
        return b * h * self.cumulative_length * d * 2 * 2


class SparseKVCache(Cache):
    """A transformers ``Cache`` of ``SparseKVLayer``s; use with attention
    ``"sparamx_kv"`` (``enable_sparse_kv`` sets both up)."""

    def __init__(self, settings: KVSettings | dict | None = None, config=None):
        if isinstance(settings, dict):
            settings = KVSettings.from_dict(settings)
        self.settings = settings or KVSettings()
        if config is not None:
            impl = getattr(config, "_attn_implementation", None)
            if impl != ATTENTION_NAME:
                raise ValueError(
                    f"SparseKVCache needs attn_implementation={ATTENTION_NAME!r} (the cache "
                    f"hands compressed tokens to that attention function), the model uses "
                    f"{impl!r}; call sparamx.kv.enable_sparse_kv(model, settings)"
                )
        super().__init__(layer_class_to_replicate=functools.partial(SparseKVLayer, self.settings))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes() for layer in self.layers)


# ------------------------------------------------------------------------ attention


def _mask_allows_all(mask: torch.Tensor | None) -> bool:
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def _value_channel_norms(module, hkv: int, d: int) -> torch.Tensor | None:
    """Wanda-style value scores' weights, ``[Hkv, D]``: for channel j of KV head h the
    norm of the ``o_proj`` columns it feeds (one per query head of the group): a value
    entry reaches the layer's output through those columns, scaled by attention weights
    that are the same for every channel of the token. Cached on the module; None when it
    has no ``o_proj`` (values are then pruned by magnitude)."""
    cached = getattr(module, "_sparamx_v_col", None)
    if cached is not None:
        return cached
    proj = getattr(module, "o_proj", None)
    w = getattr(proj, "weight", None)  # packed layers unpack on demand
    if w is None or w.dim() != 2 or w.shape[1] % (hkv * d):
        return None
    col = w.detach().float().pow(2).sum(0).view(hkv, -1, d).sum(1).sqrt()
    module._sparamx_v_col = col
    return col


def sparse_kv_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers attention function (``attn_implementation="sparamx_kv"``). Shapes:
    query ``[B, Hq, q_len, D]``, key/value ``[B, Hkv, n, D]``; returns ``([B, q_len, Hq,
    D], None)`` as transformers' SDPA function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(key, "_sparamx_kv_layer", None)  # None: another cache (plain SDPA)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and layer.settings.method == "wanda" and layer.v_col is None:
        layer.v_col = _value_channel_norms(module, key.shape[1], key.shape[3])
    unsupported = (
        kw.get("softcap") is not None
        or kw.get("s_aux") is not None
        or kw.get("position_bias") is not None
        or (kw.get("sliding_window") or 0) > 0
    )
    decode_ok = (
        layer is not None
        and query.shape[2] == 1
        and not unsupported
        and dropout == 0.0
        and _mask_allows_all(attention_mask)
    )
    if decode_ok:
        out = layer.attend(query[:, :, 0], scale).unsqueeze(1)  # [B, 1, Hq, D]
        layer.compact()
        return out.to(query.dtype), None
    if layer is not None:
        if query.shape[2] > 1 and layer.settings.method == "wanda":
            layer.observe_queries(query)
        key, value = layer.dense_kv()
    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout, scale, is_causal, **kw
    )
    if layer is not None:
        layer.compact()
    return out


# ------------------------------------------------------------------------ wiring


def register() -> None:
    """Register ``"sparamx_kv"`` with transformers' attention and mask interfaces (the
    mask is SDPA's; decode ignores it when it allows every position)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sparse_kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_sparse_kv(model, settings: KVSettings | dict):
    """Switch ``model`` to the sparse KV cache: attention ``"sparamx_kv"`` and a fresh
    ``SparseKVCache`` for every ``model.generate`` call that passes no cache. Returns
    ``model``. ``settings.method == "none"`` gives our dense cache with our kernel."""
    if isinstance(settings, dict):
        settings = KVSettings.from_dict(settings)
    register()
    model.config._attn_implementation = ATTENTION_NAME
    for cfg in (getattr(model.config, "text_config", None),):
        if cfg is not None:
            cfg._attn_implementation = ATTENTION_NAME
    model._sparamx_kv = settings
    if not hasattr(model, "_sparamx_generate"):
        model._sparamx_generate = model.generate

        @functools.wraps(model._sparamx_generate)
        def generate(*args, **kwargs):
            # transformers 5 renamed past_key_values to cache; honour either
            if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
                kwargs["cache"] = SparseKVCache(model._sparamx_kv, model.config)
            return model._sparamx_generate(*args, **kwargs)

        model.generate = generate
    return model


def disable_sparse_kv(model, attn_implementation: str = "sdpa"):
    """Undo ``enable_sparse_kv``: back to ``attn_implementation`` and stock generate."""
    model.config._attn_implementation = attn_implementation
    text = getattr(model.config, "text_config", None)
    if text is not None:
        text._attn_implementation = attn_implementation
    if hasattr(model, "_sparamx_generate"):
        model.generate = model._sparamx_generate
        del model._sparamx_generate
    model.__dict__.pop("_sparamx_kv", None)
    return model


def new_cache(model) -> SparseKVCache:
    """A fresh cache with the settings ``enable_sparse_kv`` gave ``model``."""
    settings = getattr(model, "_sparamx_kv", None)
    if settings is None:
        raise ValueError("model has no sparse KV settings; call enable_sparse_kv(model, ...)")
    return SparseKVCache(settings, model.config)


@torch.inference_mode()
def decode_perplexity(
    model, input_ids: torch.Tensor, cache: Cache | None = None, prefill: int = 0
) -> dict:
    """Perplexity of ``input_ids[1, n]`` on the decode path: ``prefill`` tokens go in as
    one prefill (dense attention; Wanda-style scores gather their query norms there),
    the rest one token at a time through ``cache``, so the sparse cache is read as in
    generation (lm-eval's loglikelihood tasks only ever run prefill). Scores the
    predictions of tokens ``max(prefill, 1) .. n-1``. Returns ``{"ppl", "nll", "tokens"}``."""
    n = input_ids.shape[-1]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or n < 2:
        raise ValueError(f"input_ids must be [1, n] with n >= 2, got {tuple(input_ids.shape)}")
    if not 0 <= prefill < n:
        raise ValueError(f"prefill must be in 0..{n - 1} for {n} tokens, got {prefill}")
    if cache is None:
        cache = new_cache(model) if hasattr(model, "_sparamx_kv") else None
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    nll, scored = 0.0, 0
    start = max(prefill, 1)
    if prefill:
        out = model(input_ids[:, :prefill], cache=cache, use_cache=True)
        nll -= float(out.logits[0, -1].float().log_softmax(-1)[input_ids[0, prefill]])
        scored += 1
        start = prefill + 1
    for t in range(start - 1, n - 1):
        out = model(
            input_ids[:, t : t + 1], cache=cache, position_ids=torch.tensor([[t]]), use_cache=True
        )
        nll -= float(out.logits[0, -1].float().log_softmax(-1)[input_ids[0, t + 1]])
        scored += 1
    return {"ppl": math.exp(nll / scored), "nll": nll, "tokens": scored}
