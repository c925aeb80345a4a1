"""Prepare the data of our offline lm-eval tasks from real text, once, into the cache.

Sources are two files of gensim 4.4.0's test data (see ``sparamx.assets.gensim_text``):
``lee_background.cor`` (300 news articles, one per line) and ``questions-words.txt``
(19,544 word analogies in 14 sections). They become JSONL files under
``cache_dir()/eval_data/<DATA_VERSION>/``:

- ``lee_news.jsonl``: ``{"id", "text"}`` per article (``lee_news_ppl``).
- ``word_analogy/<section>.jsonl``: ``{"id", "section", "a", "b", "c", "answer",
  "choices", "label"}`` per analogy (``word_analogy_mc_<section>``).
- ``manifest.json``: the sha256 of each source and each prepared file, written last,
  so its presence means a complete preparation.

Preparation is deterministic (fixed seed, sorted pools, sorted JSON keys), every file
is written to a temp name and renamed, the sources are checked against pinned
checksums, and the prepared files are checked against the manifest on every use.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the prepared format or the preparation itself changes: a new version
# prepares into a new directory, so old and new caches never mix.
DATA_VERSION = "v1"
ANALOGY_SEED = 0
# The answer plus 3 distractors: chance accuracy 0.25.
ANALOGY_CHOICES = 4

LEE_SOURCE = "lee_background.cor"
ANALOGY_SOURCE = "questions-words.txt"
# gensim==4.4.0 is pinned in sparamx.assets, so its files never change; a different
# checksum means a corrupt or substituted download.
SOURCE_SHA256 = {
    LEE_SOURCE: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    ANALOGY_SOURCE: "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
}
LEE_FILE = "lee_news.jsonl"
ANALOGY_DIR = "word_analogy"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """A source or prepared data file is empty, malformed or fails its checksum."""


@dataclass(frozen=True)
class PreparedData:
    """Where the prepared data lies and what the manifest says about it."""

    root: Path
    manifest: dict


def data_root() -> Path:
    from sparamx.assets import cache_dir

    return cache_dir() / "eval_data" / DATA_VERSION


def sha256_file(path: Path) -> str:
    from sparamx.assets import sha256_file as _sha

    return _sha(Path(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        # mkstemp creates 0600; give the file the mode a plain open() would have, so a
        # shared cache stays readable by others.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonl(rows: list[dict]) -> str:
    # Sorted keys and no ASCII escaping: the bytes (and so the checksum) depend only on
    # the rows, not on dict insertion order.
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def lee_news_rows(src: Path) -> list[dict]:
    """One row per non-empty line (article) of ``lee_background.cor``."""
    text = Path(src).read_text(encoding="utf-8")
    rows = [
        {"id": i, "text": line.strip()} for i, line in enumerate(text.splitlines()) if line.strip()
    ]
    if not rows:
        raise DataError(f"lee_news_ppl: source {src} has no articles (empty dataset)")
    return rows


def parse_analogies(src: Path) -> dict[str, list[tuple[str, str, str, str]]]:
    """``questions-words.txt`` as ``{section: [(a, b, c, answer), ...]}`` in file order."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for n, line in enumerate(Path(src).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith(":"):
            current = line[1:].strip()
            sections.setdefault(current, [])
            continue
        words = line.split()
        if current is None or len(words) != 4:
            raise DataError(
                f"word_analogy_mc: {src}:{n}: expected 4 words after a "
                f"': section' line, got {line!r}"
            )
        sections[current].append(tuple(words))
    sections = {k: v for k, v in sections.items() if v}
    if not sections:
        raise DataError(f"word_analogy_mc: source {src} has no analogies (empty dataset)")
    return sections


def analogy_rows(
    section: str,
    questions: list[tuple[str, str, str, str]],
    seed: int = ANALOGY_SEED,
    n_choices: int = ANALOGY_CHOICES,
) -> list[dict]:
    """Multiple-choice rows: the answer plus distractors drawn from the section's answers.

    Distractors come from the same section (countries for capitals, adverbs for
    adjective-to-adverb, ...) so that the task tests the relation, not the word type.
    """
    # One generator per section, seeded by its name: a section's questions do not
    # depend on which other sections exist or their order.
    rng = random.Random(f"sparamx-word-analogy:{seed}:{section}")
    pool = sorted({q[3] for q in questions})
    rows = []
    for i, (a, b, c, answer) in enumerate(questions):
        taken = {w.lower() for w in (a, b, c, answer)}
        candidates = [w for w in pool if w.lower() not in taken]
        if len(candidates) < n_choices - 1:
            raise DataError(
                f"word_analogy_mc: section {section!r} has too few distinct "
                f"answers ({len(pool)}) for {n_choices} choices"
            )
        choices = [answer, *rng.sample(candidates, n_choices - 1)]
        rng.shuffle(choices)  # the gold position must not be constant
        rows.append(
            {
                "id": f"{section}/{i}",
                "section": section,
                "a": a,
                "b": b,
                "c": c,
                "answer": answer,
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    return rows


def _verify_source(name: str, path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise DataError(
            f"source {name} ({path}) has sha256 {digest}, expected {expected} "
            "(corrupt or substituted gensim download? delete it to fetch again)"
        )
    return digest


def prepare_into(
    root: Path,
    lee_src: Path,
    analogy_src: Path,
    expected_sources: dict[str, str] | None = SOURCE_SHA256,
) -> dict:
    """Prepare all task data from the given sources into ``root``; return the manifest.

    ``expected_sources`` pins the sources' sha256 (pass None to accept any source,
    e.g. for tests on synthetic text).
    """
    root = Path(root)
    expected_sources = expected_sources or {}
    sources = {
        name: {"sha256": _verify_source(name, path, expected_sources.get(name))}
        for name, path in ((LEE_SOURCE, lee_src), (ANALOGY_SOURCE, analogy_src))
    }
    outputs: dict[str, list[dict]] = {LEE_FILE: lee_news_rows(lee_src)}
    for section, questions in parse_analogies(analogy_src).items():
        outputs[f"{ANALOGY_DIR}/{section}.jsonl"] = analogy_rows(section, questions)
    files = {}
    for rel, rows in outputs.items():
        write_atomic(root / rel, _jsonl(rows))
        files[rel] = {"sha256": sha256_file(root / rel), "docs": len(rows)}
    manifest = {
        "version": DATA_VERSION,
        "analogy_seed": ANALOGY_SEED,
        "analogy_choices": ANALOGY_CHOICES,
        "sources": sources,
        "files": files,
    }
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info("prepared eval data in %s (%d files)", root, len(files))
    return manifest


def verify(root: Path) -> dict:
    """Check every prepared file against the manifest; return the manifest.

    Raises DataError naming the first file that is missing or differs.
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"eval data manifest {root / MANIFEST} is unreadable: {e}") from e
    if manifest.get("version") != DATA_VERSION:
        raise DataError(
            f"eval data in {root} is version {manifest.get('version')!r}, expected {DATA_VERSION!r}"
        )
    for rel, info in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"prepared eval data file {path} is missing")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise DataError(
                f"prepared eval data file {path} has sha256 {digest}, "
                f"manifest says {info['sha256']}"
            )
        if info["docs"] == 0:
            raise DataError(f"prepared eval data file {path} is an empty dataset")
    return manifest


def prepare(force: bool = False) -> PreparedData:
    """Prepared, verified data for the offline tasks (prepared on first use)."""
    root = data_root()
    if not force and (root / MANIFEST).is_file():
        try:
            return PreparedData(root, verify(root))
        except DataError as e:
            # The preparation is deterministic, so redoing it is safe; say why.
            log.warning("%s; preparing the eval data again", e)
    from sparamx.assets import gensim_text

    prepare_into(root, gensim_text(LEE_SOURCE), gensim_text(ANALOGY_SOURCE))
    return PreparedData(root, verify(root))
