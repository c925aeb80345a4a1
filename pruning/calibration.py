"""Calibration token sets for activation-aware pruning (Wanda).

Two named sources, both real text:

- ``wikipedia`` (offline default): the Wikipedia XML dump excerpt shipped in gensim's test
  data, article text only, markup removed by :func:`strip_wikitext`. It is never the
  evaluation text (``lee_background.cor`` is news and stays out of calibration).
- ``c4`` (hub users): ``allenai/c4`` en train shard 0, sampled as in the Wanda paper.

A calibration set is a ``LongTensor[samples, seqlen]`` of token windows. Named sources are
cached as safetensors under ``cache_dir()/calibration/``, keyed by a hash of the tokenizer,
the settings and the source file, and written atomically (temp file + rename).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
C4_REPO = "allenai/c4"
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
# Bump when the stripper or the window sampling changes: old cache entries then miss.
FORMAT_VERSION = 1
SOURCES = ("wikipedia", "c4")


@dataclass(frozen=True)
class Calibration:
    """Which calibration set to build. The defaults are the offline set for SmolLM2-scale
    models: Wanda is insensitive to calibration size (paper, Fig. 4), and 32 x 256 tokens
    keeps layer-by-layer pruning of a 135M model to about a minute on one core."""

    source: str = "wikipedia"
    samples: int = 32
    seqlen: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"calibration source {self.source!r} is not one of {SOURCES}")
        for field in ("samples", "seqlen"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
                raise ValueError(
                    f"calibration {field} must be a positive int, got {getattr(self, field)!r}"
                )


# Wanda paper setting (C4, 128 x 2048, seed 0), for users with hub access.
C4_PAPER = Calibration(source="c4", samples=128, seqlen=2048, seed=0)


# --------------------------------------------------------------------------- wikitext
# Non-prose blocks that are dropped with their content.
_DROP_TAGS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "syntaxhighlight",
    "source",
    "score",
    "imagemap",
    "chem",
    "hiero",
    "graph",
    "mapframe",
    "templatedata",
)
_DROP_TAG_RE = re.compile(
    r"<(" + "|".join(_DROP_TAGS) + r")\b[^>]*?(?:/>|>.*?</\1\s*>)", re.I | re.S
)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.S)
# Innermost template / link: no "{{" / "[[" inside; single braces and brackets may occur
# in their text (e.g. "{{Pre2|...{|}~}}", "[[File:x.jpg|thumb|a [b] c]]").
_TEMPLATE_RE = re.compile(r"\{\{((?:[^{}]|\{(?!\{)|\}(?!\}))*)\}\}")
_TABLE_RE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost table
_LINK_RE = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_EXT_LINK_RE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_URL_RE = re.compile(r"https?://\S+")
_TAG_RE = re.compile(r"</?[a-zA-Z][^<>]*>")
_HEADING_RE = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
# Sections after which an article is only citations and link lists.
_END_SECTIONS = {
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
}
# Links to these namespaces are images, categories or metadata, not prose.
_DROP_LINK_NS = {"file", "image", "media", "category"}


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    prefix, colon, _ = target.lstrip(":").partition(":")
    prefix = prefix.strip().lower()
    # [[File:..]], [[Category:..]] and interlanguage links ([[de:..]]) carry no prose;
    # [[:Category:X]] (leading colon) is a visible link and keeps its text.
    if (
        colon
        and not target.startswith(":")
        and (prefix in _DROP_LINK_NS or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", prefix))
    ):
        return ""
    # [[a|b]] shows b; a trailing pipe ([[Foo (bar)|]]) shows the target; the last pipe
    # segment is the caption in a File link whose inner links were already resolved.
    return (label.rpartition("|")[2] if label else target).strip()


def _sub_until_stable(pattern: re.Pattern, repl, text: str, limit: int = 50) -> str:
    # Templates, tables and links nest; remove innermost first until nothing matches.
    for _ in range(limit):
        text, n = pattern.subn(repl, text)
        if not n:
            break
    return text


def strip_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: references, templates, tables, images, categories,
    comments and HTML tags removed; links replaced by their visible text; the article cut
    before its end matter (See also, References, ...)."""
    text = _COMMENT_RE.sub("", text)
    text = _DROP_TAG_RE.sub("", text)
    text = _sub_until_stable(_TEMPLATE_RE, "", text)
    text = _sub_until_stable(_TABLE_RE, "", text)
    text = _sub_until_stable(_LINK_RE, _link_text, text)
    text = _EXT_LINK_RE.sub(r"\1", text)
    text = _URL_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ and other magic words
    out = []
    for line in text.split("\n"):
        heading = _HEADING_RE.match(line)
        if heading:
            if heading.group(2).strip().lower() in _END_SECTIONS:
                break
            out.append("")  # headings become paragraph breaks
            continue
        line = line.strip()
        # Leftovers of unbalanced tables/templates start with these; list markers go.
        if line.startswith(("{|", "|", "!", "{{", "}}")):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        out.append(line)
    text = html.unescape("\n".join(out)).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left where templates were
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


def wikipedia_articles(
    path: str | os.PathLike | None = None, min_chars: int = 200
) -> Iterator[str]:
    """Stripped article texts (main namespace, no redirects) of a MediaWiki XML dump (.bz2)."""
    if path is None:
        from sparamx.assets import gensim_text

        path = gensim_text(WIKI_FILE)
    with bz2.open(path, "rb") as f:
        page: dict[str, str] = {}
        for _, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rpartition("}")[2]
            if tag in ("ns", "text"):
                page[tag] = elem.text or ""
            elif tag == "redirect":
                page["redirect"] = "1"
            elif tag == "page":
                if page.get("ns") == "0" and "redirect" not in page:
                    body = strip_wikitext(page.get("text", ""))
                    if len(body) >= min_chars:
                        yield body
                page = {}
                elem.clear()  # keep memory flat over the whole dump


# --------------------------------------------------------------------------- windows
def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before text (e.g. Llama/Gemma BOS; none for SmolLM2/Qwen).
    Each window starts with them so calibration sees what inference sees."""
    with_sp = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    if without and without[0] in with_sp:
        return list(with_sp[: with_sp.index(without[0])])
    return []


def windows_from_documents(
    documents: Sequence[str] | str, tokenizer, samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens drawn (seeded, without replacement) from the
    non-overlapping ``seqlen``-token chunks of each document; a window never spans two
    documents. Raises if the text holds fewer chunks than requested (no silent shortfall)."""
    if isinstance(documents, str):
        documents = [documents]
    prefix = _special_prefix(tokenizer)
    body = seqlen - len(prefix)
    if body <= 0:
        raise ValueError(
            f"seqlen {seqlen} leaves no room after the tokenizer's "
            f"{len(prefix)} special prefix tokens"
        )
    ids = tokenizer(list(documents), add_special_tokens=False).input_ids
    chunks = [(d, s) for d, toks in enumerate(ids) for s in range(0, len(toks) - body + 1, body)]
    if len(chunks) < samples:
        total = sum(len(t) for t in ids)
        raise ValueError(
            f"calibration text too short: {len(documents)} document(s), {total} tokens give "
            f"only {len(chunks)} window(s) of {seqlen} tokens, but {samples} were requested; "
            f"supply more text or lower samples/seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(chunks), generator=g)[:samples].tolist()
    rows = [prefix + ids[d][s : s + body] for d, s in (chunks[i] for i in picked)]
    return torch.tensor(rows, dtype=torch.long)


def c4_windows(tokenizer, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """The Wanda paper's sampling from C4 (en train shard 0): a random document longer than
    ``seqlen`` tokens, a random window in it, repeated. Needs the hub."""
    try:
        from datasets import load_dataset

        data = load_dataset(C4_REPO, data_files={"train": C4_SHARD}, split="train")
    except Exception as e:  # offline, gated, missing package: all the same to the caller
        raise RuntimeError(
            f"calibration source 'c4' needs the Hugging Face hub ({C4_REPO}, {C4_SHARD}) "
            f"and could not load it ({type(e).__name__}: {e}); offline, use the default "
            f"source 'wikipedia'"
        ) from e
    prefix = _special_prefix(tokenizer)
    body = seqlen - len(prefix)
    rng = random.Random(seed)
    rows: list[list[int]] = []
    for _ in range(1000 * samples):  # bounded: a shard of short documents must not hang
        if len(rows) == samples:
            break
        toks = tokenizer(data[rng.randrange(len(data))]["text"], add_special_tokens=False).input_ids
        if len(toks) > body:
            start = rng.randrange(len(toks) - body)
            rows.append(prefix + toks[start : start + body])
    if len(rows) < samples:
        raise ValueError(f"c4: found only {len(rows)} documents longer than {seqlen} tokens")
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:  # slow tokenizers: the vocab and the special tokens decide the ids
        spec = json.dumps(
            [
                type(tokenizer).__name__,
                sorted(tokenizer.get_vocab().items()),
                tokenizer.all_special_tokens,
            ]
        )
    spec += json.dumps(_special_prefix(tokenizer))
    return hashlib.sha256(spec.encode()).hexdigest()


def _source_fingerprint(source: str) -> str:
    if source == "wikipedia":
        from sparamx.assets import gensim_text, sha256_file

        return sha256_file(gensim_text(WIKI_FILE))
    return f"{C4_REPO}/{C4_SHARD}"


def _cache_path(calib: Calibration, tokenizer) -> Path:
    from sparamx.assets import cache_dir

    key = json.dumps(
        {
            "format": FORMAT_VERSION,
            **asdict(calib),
            "source_sha": _source_fingerprint(calib.source),
            "tokenizer": tokenizer_fingerprint(tokenizer),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"{calib.source}-{calib.samples}x{calib.seqlen}-seed{calib.seed}-{digest}"
    return cache_dir() / "calibration" / f"{name}.safetensors"


def load_calibration(
    tokenizer, calib: Calibration | None = None, *, use_cache: bool = True
) -> torch.Tensor:
    """Token windows ``[samples, seqlen]`` for a named source, built once and then cached."""
    from safetensors.torch import load_file, save_file

    calib = calib or Calibration()
    if tokenizer is None:
        raise ValueError(f"calibration source {calib.source!r} needs a tokenizer")
    path = _cache_path(calib, tokenizer)
    if use_cache and path.is_file():
        try:
            ids = load_file(path)["input_ids"]
            if ids.shape == (calib.samples, calib.seqlen) and ids.dtype == torch.long:
                log.info("calibration: cached %s", path)
                return ids
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("calibration: ignoring unreadable cache file %s (%s)", path, e)
    if calib.source == "wikipedia":
        ids = windows_from_documents(
            list(wikipedia_articles()), tokenizer, calib.samples, calib.seqlen, calib.seed
        )
    else:
        ids = c4_windows(tokenizer, calib.samples, calib.seqlen, calib.seed)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(
                {"input_ids": ids.contiguous()},
                tmp,
                metadata={k: str(v) for k, v in asdict(calib).items()},
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("calibration: built %s %s, cached at %s", calib.source, tuple(ids.shape), path)
    return ids


def resolve_calibration(calibration, tokenizer) -> tuple[torch.Tensor, dict]:
    """Turn ``prune``'s ``calibration`` argument into token ids plus a description.

    Accepts None (offline default), a source name, a :class:`Calibration`, or a ready
    ``LongTensor[samples, seqlen]`` of token ids.
    """
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError(
                "calibration token ids must be a LongTensor [samples, seqlen], "
                f"got {calibration.dtype} {tuple(calibration.shape)}"
            )
        return calibration, {
            "source": "tensor",
            "samples": calibration.shape[0],
            "seqlen": calibration.shape[1],
        }
    if calibration is None or isinstance(calibration, str):
        calibration = Calibration(source=calibration or "wikipedia")
    if not isinstance(calibration, Calibration):
        raise TypeError(
            "calibration must be None, a source name, a Calibration or a "
            f"LongTensor of token ids, got {type(calibration).__name__}"
        )
    return load_calibration(tokenizer, calibration), asdict(calibration)
