"""Module selection: which linears of a model are pruned and packed.

One pattern language, used the same way by pruning (``prune.include`` / ``prune.skip``),
packing (``pack.include`` / ``pack.exclude``) and ``sparamx.swap_linears``. A module name
such as ``model.layers.3.mlp.down_proj`` matches a pattern that is

- the exact name,
- a dotted suffix of it (``mlp.down_proj``, ``down_proj``, ``lm_head``),
- a glob over the whole name (``*.mlp.*``, ``model.layers.1?.*``; ``fnmatch`` rules,
  case-sensitive), or
- ``re:REGEX``, a Python regular expression that must match the whole name
  (``re:.*\\.(gate|up|down)_proj``).

A module is selected when it matches an include pattern and no exclude pattern.

This file imports nothing heavy (no torch extension), so pruning and config
validation can use it without the native build.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

REGEX_PREFIX = "re:"


class PatternError(ValueError):
    """A module pattern that is not a valid regular expression or is empty."""


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern[len(REGEX_PREFIX) :])
    except re.error as e:
        raise PatternError(
            f"module pattern {pattern!r}: invalid regular expression ({e})"
        ) from None


def check_patterns(patterns: Iterable[str], where: str = "patterns") -> list[str]:
    """Validate patterns (non-empty strings; ``re:`` ones compile); return them as a list.
    ``where`` names the field in the error message."""
    out = []
    for i, p in enumerate(patterns):
        if not isinstance(p, str) or not p.strip():
            raise PatternError(f"{where}[{i}]: expected a non-empty pattern string, got {p!r}")
        if p.startswith(REGEX_PREFIX):
            try:
                _compiled(p)
            except PatternError as e:
                raise PatternError(f"{where}[{i}]: {e}") from None
        out.append(p)
    return out


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches one pattern (see the module docstring)."""
    if pattern.startswith(REGEX_PREFIX):
        return _compiled(pattern).fullmatch(name) is not None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: Sequence[str] | None) -> bool:
    return any(matches(name, p) for p in patterns or ())


def is_selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """``include`` None means everything; ``exclude`` None means nothing."""
    return (include is None or matches_any(name, include)) and not matches_any(name, exclude)


def unmatched(patterns: Sequence[str] | None, names: Iterable[str]) -> list[str]:
    """Patterns that match none of ``names`` (usually a typo worth a warning)."""
    names = list(names)
    return [p for p in patterns or () if not any(matches(n, p) for n in names)]
