"""Run-directory bookkeeping: ``state.json`` records, per stage, the hash of its inputs,
its outputs with a fingerprint of each, a one-line summary and its time. A stage is
skipped when its input hash and output fingerprints still match; downstream stages
hash the fingerprints of their upstream outputs, so re-running a stage re-runs what
depends on it."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifact import atomic_write_json


@dataclass
class StageResult:
    """What a stage returns: its outputs (paths relative to the run directory, which
    ``state.json`` fingerprints) and a one-line summary."""

    outputs: list[str]
    summary: str


def fingerprint(path: Path) -> str:
    """Cheap identity of a file or directory tree: names, sizes and mtimes."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def hash_inputs(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def is_done(self, stage: str, inputs_hash: str) -> bool:
        rec = self.data["stages"].get(stage)
        if not rec or rec.get("inputs") != inputs_hash:
            return False
        return all(fingerprint(self.run_dir / o) == fp for o, fp in rec["outputs"].items())

    def record(
        self, stage: str, inputs_hash: str, outputs: list[str], summary: str, seconds: float
    ) -> None:
        self.data["stages"][stage] = {
            "inputs": inputs_hash,
            "outputs": {o: fingerprint(self.run_dir / o) for o in outputs},
            "summary": summary,
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(self.path, self.data)

    def set_meta(self, key: str, value) -> None:
        """Run-wide facts beside the stages (e.g. the resolved compute dtype), written
        now. Not part of any stage's hash: stages hash what they depend on themselves."""
        if self.data.get(key) != value:
            self.data[key] = value
            atomic_write_json(self.path, self.data)

    def outputs_fingerprint(self, stage: str) -> dict:
        rec = self.data["stages"].get(stage)
        return rec["outputs"] if rec else {}

    def summary(self, stage: str) -> str | None:
        rec = self.data["stages"].get(stage)
        return rec["summary"] if rec else None
