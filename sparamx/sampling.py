"""Choosing the next token: sampling parameters, logits processing and stop conditions.

``SamplingParams`` holds what ``sparamx.generate`` takes beyond greedy decoding, with
transformers' ``GenerationConfig`` names and defaults; ``SamplingParams.resolve`` fills
what the caller left out from the model's ``generation_config`` (then from
transformers' global defaults), so a model whose ``generation_config.json`` asks for
sampling samples, and one that does not stays greedy.

``TokenChooser`` turns the last position's logits into the next token the way
``model.generate`` does: fp32 scores, the repetition penalty (greedy or not), then,
when sampling, temperature -> top-k -> top-p -> min-p (transformers' order) and one
``torch.multinomial`` draw from a ``torch.Generator`` (seeded: reproducible). Each step
is a small function here, tested against transformers' own processors and warpers.

``StopText`` follows the decoded text for stop strings and streaming: the pieces it
hands to ``stream`` never contain a stop string, nor the start of one that may still
complete (that text is held back until it cannot).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256  # when neither the caller nor generation_config sets one
# transformers' defaults for the fields a GenerationConfig leaves unset
# (GenerationConfig._get_default_generation_params)
HF_DEFAULTS = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}
FILTERED = -math.inf  # the score of a token a warper removes (transformers' filter_value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``do_sample=False``: argmax (after the repetition
    penalty, as transformers applies it when greedy too). ``top_k=0`` / ``top_p=1.0``
    / ``min_p=None`` switch that filter off. ``stop``: strings that end the text (not
    included in it); ``stop_token_ids``: tokens that end it (included in ``ids``, like
    an end-of-sequence token). ``seed``: seeds the sampling generator (None: a fresh
    random seed per call)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_params(self)

    @classmethod
    def resolve(cls, generation_config=None, **given) -> SamplingParams:
        """Caller's values (those not None) over ``generation_config``'s (those not None)
        over transformers' defaults. ``stop`` may be one string or several; the
        generation config's ``stop_strings`` are its default."""
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {}
        for name, default in HF_DEFAULTS.items():
            value = given.get(name)
            if value is None:
                value = getattr(generation_config, name, None)
            values[name] = default if value is None else value
        if values["top_k"] is None:
            values["top_k"] = 0
        stop = given.get("stop")
        if stop is None:
            stop = getattr(generation_config, "stop_strings", None)
        values["stop"] = _as_strings(stop)
        values["stop_token_ids"] = _as_ids(given.get("stop_token_ids"))
        values["seed"] = given.get("seed")
        params = cls(**values)
        _warn_unused(params, given)
        return params

    @property
    def greedy_argmax(self) -> bool:
        """The next token is the plain argmax of the logits (no processing at all)."""
        return not self.do_sample and self.repetition_penalty == 1.0


def _as_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return tuple(stop)


def _as_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, Sequence) or not all(_is_int(i) and i >= 0 for i in ids):
        raise TypeError(f"stop_token_ids must be a list of non-negative ints, got {ids!r}")
    return tuple(int(i) for i in ids)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_params(p: SamplingParams) -> None:
    """Every field's range, with transformers' rules; each error names the field."""
    if not isinstance(p.do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {p.do_sample!r}")
    if not _is_number(p.temperature) or p.temperature <= 0:
        raise ValueError(
            f"temperature must be a number > 0, got {p.temperature!r} "
            "(for greedy decoding pass do_sample=False)"
        )
    if not _is_int(p.top_k) or p.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {p.top_k!r}")
    if not _is_number(p.top_p) or not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {p.top_p!r}")
    if p.min_p is not None and (not _is_number(p.min_p) or not 0 <= p.min_p <= 1):
        raise ValueError(f"min_p must be a number in [0, 1] or None, got {p.min_p!r}")
    if not _is_number(p.repetition_penalty) or p.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a number > 0, got {p.repetition_penalty!r}")
    if p.seed is not None and not _is_int(p.seed):
        raise TypeError(f"seed must be an int or None, got {p.seed!r}")


def _warn_unused(p: SamplingParams, given: dict) -> None:
    if p.do_sample:
        return
    unused = [n for n in ("temperature", "top_k", "top_p", "min_p", "seed") if given.get(n)]
    if unused:
        log.warning("do_sample is False: %s ignored (greedy decoding)", ", ".join(unused))


# ------------------------------------------------------------ logits steps
# Each takes and returns fp32 scores [batch, vocab]; removed tokens score FILTERED.


def apply_repetition_penalty(
    scores: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make the tokens already in the sequence (``seen``: bool ``[batch, vocab]``) less
    likely: a positive score is divided by ``penalty``, a negative one multiplied (so
    both move toward lower probability for ``penalty > 1``)."""
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores (and any tied with the k-th)."""
    k = min(k, scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, FILTERED)


def apply_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens whose mass reaches ``p``. Works
    from the least probable end: a token goes when it and every less probable token
    together hold at most ``1 - p`` of the mass; the most probable token always stays."""
    ascending, order = scores.sort(dim=-1)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, FILTERED)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less probable than ``min_p`` times the most probable one."""
    probs = scores.softmax(dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p
    drop = probs < floor
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # the best always stays
    return scores.masked_fill(drop, FILTERED)


def process_logits(
    scores: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None
) -> torch.Tensor:
    """All the steps ``params`` switches on, in transformers' order."""
    if params.repetition_penalty != 1.0 and seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if not params.do_sample:
        return scores
    if params.temperature != 1.0:
        scores = apply_temperature(scores, params.temperature)
    if params.top_k:
        scores = apply_top_k(scores, params.top_k)
    if params.top_p < 1.0:
        scores = apply_top_p(scores, params.top_p)
    if params.min_p is not None:
        scores = apply_min_p(scores, params.min_p)
    return scores


# ------------------------------------------------------------ the chooser


class TokenChooser:
    """The next token from the last position's logits ``[1, vocab]`` -> ``[1, 1]``,
    remembering the tokens seen (prompt and output) for the repetition penalty."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.prompt_ids = prompt_ids.reshape(-1)
        self.seen: torch.Tensor | None = None  # bool [1, vocab], made on the first call

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is None and self.params.repetition_penalty != 1.0:
            # sized from the logits: the vocabulary the head scores, which may be
            # padded past the tokenizer's
            self.seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
            self.seen[0, self.prompt_ids] = True
        scores = process_logits(logits.float(), self.params, self.seen)
        if self.params.do_sample:
            probs = scores.softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        if self.seen is not None:
            self.seen[0, token[0, 0]] = True
        return token


# ------------------------------------------------------------ stop text


class StopText:
    """Decoded text of the new tokens, checked for stop strings after every token.

    ``put(tid)`` returns True when the text now contains a stop string; ``text`` is the
    text before it. With ``stream``, each new piece goes out as soon as no stop string
    can start in it (and it does not end in an incomplete multi-byte character)."""

    def __init__(self, tokenizer, stop: Sequence[str], stream: Callable[[str], object] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, tuple(stop), stream
        self.ids: list[int] = []
        self.text = ""
        self.decoded = ""  # the latest decode, possibly ending in an incomplete character
        self.sent = 0  # characters of text already streamed
        self.stopped = False

    def put(self, tid: int) -> bool:
        if self.stopped:
            return True
        self.ids.append(tid)
        text = self.decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for the next token
        return self._update(text)

    def _update(self, text: str) -> bool:
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            self._send(len(self.text))
            return True
        self.text = text
        self._send(len(text) - self._held_back(text))
        return False

    def finish(self) -> None:
        """Send what is held back (generation ended without a stop string), an
        incomplete last character included (as the replacement character)."""
        if not self.stopped and len(self.decoded) > len(self.text) and self._update(self.decoded):
            return
        self._send(len(self.text))

    def _first_stop(self, text: str) -> int | None:
        # a stop string can only end in text not yet streamed; look from just before it
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

    def _send(self, upto: int) -> None:
        if self.stream is not None and upto > self.sent:
            self.stream(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)
