"""``results.csv``: one line per finished experiment, appended (write + fsync) as soon as
it finishes; a partial last line left by a crash is dropped on resume."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from ..artifact import atomic_write_text
from .grid import _csv_line

log = logging.getLogger("sparamx.sweep")

# Result columns besides the plan's and the per-metric ones (``<task>:<metric>``).
RESULT_COLUMNS = (
    "status",
    "kernel_used",
    "actual_sparsity",
    "tokens_per_s",
    "ms_per_token",
    "ttft_ms",
    "compile_s",
    "stock_tokens_per_s",
    "speedup",
    "peak_rss_mb",
    "model_bytes",
    "prompt_tokens",
    "kv_method",  # kv_sparsity > 0: the sparse KV cache's pruning method and, on the
    "kv_decode_ppl",  # decode path (eval.decode_ppl), perplexity with it and with our
    "kv_dense_decode_ppl",  # dense cache, and its bytes over the dense cache's
    "kv_memory_ratio",
    "artifact",
    "seconds",
    "load_avg",  # 1-minute load average after the timing: flags a busy, shared machine
    "finished",
)
# Headline metrics copied from the evaluation into result columns (lm-eval names).
HEADLINE_METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity", "perplexity")


class ResultsFile:
    """``results.csv``, appended one fsync'ed line per finished experiment."""

    def __init__(self, path: Path):
        self.path = path
        self.header: list[str] | None = None

    def load(self) -> list[dict]:
        """The complete rows so far. A partial last line (the process died while writing
        it) and rows that were skipped or failed are dropped from the file, so that
        those experiments run again."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        partial = lines.pop()  # "" when the file ends with a newline
        if partial:
            log.warning("results.csv: dropping a partial last line (%d bytes)", len(partial))
        lines = [ln for ln in lines if ln]
        if not lines:
            self.path.unlink()
            return []
        self.header = next(csv.reader([lines[0]]))
        rows, kept = [], [lines[0]]
        for ln in lines[1:]:
            fields = next(csv.reader([ln]))
            if len(fields) != len(self.header):
                log.warning("results.csv: dropping a malformed line: %.80s", ln)
                continue
            row = dict(zip(self.header, fields, strict=True))
            if row["status"] != "ok":
                log.info("results.csv: %s was %s; it runs again", row["id"], row["status"])
                continue
            rows.append(row)
            kept.append(ln)
        if len(kept) != len(lines) or partial:
            atomic_write_text(self.path, "\n".join(kept) + "\n")
        return rows

    def append(self, row: dict) -> None:
        if self.header is None:
            raise RuntimeError("results header not set")
        new = not self.path.is_file() or self.path.stat().st_size == 0
        text = (_csv_line(self.header) if new else "") + _csv_line(
            [row.get(c) for c in self.header]
        )
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_results(path: Path) -> list[dict]:
    """Rows of a results.csv (complete lines only; for reports)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    lines = [ln for ln in lines[:-1] if ln]  # the last element is partial or ""
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    out = []
    for ln in lines[1:]:
        fields = next(csv.reader([ln]))
        if len(fields) == len(header):
            out.append(dict(zip(header, fields, strict=True)))
    return out
