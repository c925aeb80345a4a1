"""End-to-end greedy decode speed against peers, same prompts and token counts.

Engines (``--engines``, default all):

| engine               | model                               | loop                           |
|----------------------|-------------------------------------|--------------------------------|
| `transformers`       | dense bf16 (``--dense``)            | ``model.generate``             |
| `sparamx-hf`         | packed artifact (``--artifact``)    | ``model.generate``             |
| `sparamx-lean`       | packed artifact                     | ``sparamx.generate``           |
| `sparamx-lean-fast`  | packed artifact                     | the same, ``attention="fast"`` |
| `sparamx-lean-eager` | packed artifact                     | the same, ``compile=False``    |
| `sparamx-lean-kv`    | packed artifact, sparse KV cache    | ``sparamx.generate(kv=...)``   |
| `sparamx-lean-kv-fast`| the same                            | the same, ``attention="fast"`` |
| `dense-lean`         | dense bf16                          | ``sparamx.generate``           |
| `llama.cpp-bf16`     | SmolLM2 GGUF, BF16 (same weights)   | llama-cpp-python's own loop    |
| `llama.cpp-q4_1`     | SmolLM2 GGUF, Q4_1 (as shipped)     | llama-cpp-python's own loop    |
| `llama.cpp-q8_0`     | SmolLM2 GGUF, Q8_0 (llama.cpp's quantizer on the BF16 one) | the same |

A llama.cpp engine that dies of SIGSEGV is run once more without llama.cpp's CPU weight
repacking (``use_extra_bufts=False``; on a 2-core AMX Xeon its Q4_1 and Q8_0 models
crashed on the first token with it); its record then says ``"llama_cpp_repack": false``
and its format ends in ``(no repack)``.

``--context N`` makes the prompt the first N tokens of real English text (the same
ids for every engine, llama.cpp included; ``--new-tokens`` are generated after it), so
attention over a long cache is part of each token's time. ``sparamx-lean-kv`` runs the
lean loop with the sparse KV cache of ``--kv`` (JSON, ``kv.KVSettings`` fields; default
50% K and V, magnitude, masks shared by 16 tokens); every other engine keeps a dense
cache (llama.cpp: its default f16 cache). Each record carries ``context``,
``kv_sparsity`` (0 for a dense cache) and ``kv_bytes`` (the cache after the last token).

``--artifact`` takes several packed artifacts (e.g. a dense-packed one and 50% / 70%
sparse ones); each packed engine runs once per artifact. The BF16 GGUF is written from
the shipped Q4_1 one with the ``gguf`` package (``sparamx.assets.smollm2_gguf_bf16``):
the same de-quantized weights transformers and sparamx load. llama.cpp comes from the
``peers`` extra (``pip install .[peers]`` builds llama-cpp-python from source); without
it those rows are skipped with a message.

Each (engine, threads) runs in a fresh process (threads set before any work, clean
memory). One untimed warm-up generation first (the lean path compiles there; its
compile time is reported apart); then ``--repeats`` x prompts timed generations of
exactly ``--new-tokens`` tokens (end-of-sequence ignored). ms/token is the decode
time per token after the first (mean per generation, median over generations);
tokens/s = 1000 / ms/token; TTFT is the median time to the first token. The table
also says whether the lean engines produced the same tokens as ``model.generate`` on
the same model (compared up to the first end-of-sequence token), the min / max of the
generations' ms/token, and flags (``!``, a WARNING line, ``flags`` in the JSON) a row
whose generations disagree by more than 20% or a transformers baseline that is slower
with more threads. Each record carries ``environment`` (CPU, ISA class, kernels,
threads, versions, command line). ``--dtype`` is the compute dtype of the transformers
rows and of the packed models' activations (``auto``: fp32 on CPUs without a fast bf16
matmul; see ``sparamx.cpu``).

    python bench/peers.py --artifact runs/x/pack/artifact --threads 1 2 --json peers.json
    python bench/peers.py --artifact A --engines sparamx-hf,sparamx-lean --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_flags, print_table, write_json  # noqa: E402

ENGINES = {  # name: (model, loop)
    "transformers": ("dense", "hf"),
    "sparamx-hf": ("packed", "hf"),
    "sparamx-lean": ("packed", "lean"),
    "sparamx-lean-fast": ("packed", "lean-fast"),
    "sparamx-lean-eager": ("packed", "lean-eager"),
    "sparamx-lean-kv": ("packed", "lean-kv"),
    "sparamx-lean-kv-fast": ("packed", "lean-kv-fast"),
    "dense-lean": ("dense", "lean"),
    "llama.cpp-bf16": ("gguf-bf16", "llama.cpp"),
    "llama.cpp-q4_1": ("gguf-q4_1", "llama.cpp"),
    "llama.cpp-q8_0": ("gguf-q8_0", "llama.cpp"),
}
NO_REPACK_ENV = "SPARAMX_LLAMA_NO_REPACK"  # set by run_subprocess for the retry
SAME_AS = {"sparamx-lean": "sparamx-hf", "sparamx-lean-eager": "sparamx-hf"}
SAME_AS["sparamx-lean-fast"] = "sparamx-hf"  # not bitwise: may differ after a near-tie
SAME_AS["dense-lean"] = "transformers"
DEFAULT_KV = {"method": "magnitude", "k_sparsity": 0.5, "v_sparsity": 0.5}
DEFAULT_PROMPTS = [
    "The history of the printing press begins",
    "Explain in simple words why the sky is blue.",
]


# ------------------------------------------------------------------ workers


def _load(kind: str, args):
    """(model, tokenizer, format, model_bytes) for the dense model or the artifact
    (the worker gets exactly one ``--artifact``)."""
    from sparamx.cpu import resolve_compute_dtype
    from sparamx.pipeline.bench import model_bytes

    dtype = resolve_compute_dtype(args.dtype).resolved
    if kind == "dense":
        from sparamx.models import load_model

        model, tok = load_model(args.dense, dtype=dtype)
        return model, tok, {"bfloat16": "bf16", "float32": "fp32"}[dtype], model_bytes(model)
    import sparamx
    from sparamx.artifact import read_manifest

    (artifact,) = args.artifact
    model, tok = sparamx.load(artifact, dtype=dtype)
    manifest = read_manifest(artifact)
    sparsity = (manifest.get("recipe") or {}).get("sparsity")
    storages = [layer.get("storage") for layer in manifest.get("layers", [])]
    main = max(set(storages), key=storages.count) if storages else "packed"
    if main.startswith("dense"):
        fmt = f"{main} (packed)"
    else:
        fmt = main + (f" {sparsity:.0%}" if sparsity is not None else "")
    return model, tok, fmt, model_bytes(model)


def _run_hf(model, tok, prompt, n: int) -> dict:
    from sparamx.pipeline.bench import time_generate

    r = time_generate(model, tok, prompt, n)
    keep = ("ttft_ms", "ms_per_token", "text", "prompt_tokens")
    return {k: r[k] for k in keep}


def _run_lean(model, tok, prompt, n: int, compile: bool, attention: str, kv=False) -> dict:
    from sparamx.pipeline.bench import time_generate_lean

    return time_generate_lean(model, tok, prompt, n, attention=attention, compile=compile, kv=kv)


def dense_kv_bytes(config, tokens: int, element_bytes: int) -> int:
    """Bytes of a dense K/V cache of ``tokens`` tokens for a model of ``config``."""
    text = config.get_text_config()
    d = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * d * tokens * element_bytes


def _llama_cpp_runner(threads: int, kind: str, n_ctx: int):
    """(run(prompt, n) -> record, format, model_bytes) for llama-cpp-python, or None.
    A prompt is text or token ids ``[1, T]`` (``--context``: the ids the other engines
    get; the GGUF holds the same vocabulary)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    repack = os.environ.get(NO_REPACK_ENV) != "1"
    if not repack:
        disable_llama_cpp_repack()
    gguf = _gguf(kind)
    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 2048),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(prompt, n: int) -> dict:
        if isinstance(prompt, str):
            tokens = llm.tokenize(prompt.encode("utf-8"))
        else:
            tokens = prompt[0].tolist()
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        stamps, out = [], []
        for i in range(n):
            if i:
                llm.eval([out[-1]])
            out.append(llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0))  # greedy
            stamps.append(time.perf_counter())
        return {
            "ttft_ms": (stamps[0] - start) * 1e3,
            "ms_per_token": (stamps[-1] - stamps[0]) / max(1, n - 1) * 1e3,
            "text": llm.detokenize(out).decode("utf-8", errors="replace"),
            "prompt_tokens": len(tokens),
        }

    fmt = "gguf-" + gguf.stem.rsplit(".", 1)[-1].lower()  # e.g. gguf-q4_1
    return run, fmt + ("" if repack else " (no repack)"), gguf.stat().st_size


def _gguf(kind: str):
    """The GGUF file of a llama.cpp engine: the shipped Q4_1, its BF16 conversion, or a
    Q8_0 quantized from that BF16 by llama.cpp's own quantizer (written once, beside it)."""
    from sparamx.assets import smollm2_gguf, smollm2_gguf_bf16

    if kind == "gguf-q4_1":
        return smollm2_gguf()
    bf16 = smollm2_gguf_bf16()
    if kind == "gguf-bf16":
        return bf16
    out = bf16.with_name(bf16.name.replace(".BF16.", ".Q8_0."))
    if not out.exists():
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(
            str(bf16).encode(), str(tmp).encode(), ctypes.byref(params)
        ):
            raise RuntimeError(f"llama.cpp could not quantize {bf16} to Q8_0")
        os.replace(tmp, out)
    return out


def disable_llama_cpp_repack() -> None:
    """Make ``Llama`` load with ``use_extra_bufts=False`` (no CPU weight repacking): it
    reads its model parameters from ``llama_model_default_params``, which has no
    keyword of its own in ``Llama``."""
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params


def run_worker(engine: str, args) -> dict:
    """Time one engine in this process; returns its record."""
    import torch

    torch.set_num_threads(args.threads)
    kind, loop = ENGINES[engine]
    rec = {"engine": engine, "threads": args.threads, "new_tokens": args.new_tokens}
    rec["context"] = args.context
    if kind == "packed":
        rec["artifact"] = args.artifact[0]
    prompts = args.prompts if not args.context else [_context_ids(args)]
    if loop == "llama.cpp":
        runner = _llama_cpp_runner(args.threads, kind, _n_ctx(args))
        if runner is None:
            return {
                **rec,
                "skipped": "llama_cpp is not importable (pip install llama-cpp-python, or "
                "the peers extra)",
            }
        run, rec["format"], rec["model_bytes"] = runner
    else:
        model, tok, rec["format"], rec["model_bytes"] = _load(kind, args)
        if loop == "hf":
            run = lambda p, n: _run_hf(model, tok, p, n)  # noqa: E731
        else:
            compile = loop != "lean-eager"
            attention = "fast" if loop in ("lean-fast", "lean-kv-fast") else "exact"
            kv = args.kv if loop in ("lean-kv", "lean-kv-fast") else False
            run = lambda p, n: _run_lean(model, tok, p, n, compile, attention, kv)  # noqa: E731
    t0 = time.perf_counter()
    warm = run(prompts[0], args.new_tokens if loop.startswith("lean") else 8)
    rec["warmup_s"] = time.perf_counter() - t0
    rec["compile_s"] = warm.get("compile_s")
    runs = [run(p, args.new_tokens) for _ in range(args.repeats) for p in prompts]
    from sparamx.pipeline.bench import spread, spread_flags

    ms_spread = spread(r["ms_per_token"] for r in runs)
    ms = statistics.median(r["ms_per_token"] for r in runs)
    rec.update(
        ms_per_token_spread=ms_spread,
        ms_min=ms_spread["min"],
        ms_max=ms_spread["max"],
        flags=spread_flags("ms/token", ms_spread),
        environment=environment(args.threads),
        ms_per_token=ms,
        tokens_per_s=1e3 / ms,
        ttft_ms=statistics.median(r["ttft_ms"] for r in runs),
        recompiled_while_timed=any(r.get("compile_s") for r in runs),
        texts=[r["text"] for r in runs[: len(prompts)]],
    )
    rec.update(_kv_fields(runs[-1], loop, args))
    return rec


def _kv_fields(last: dict, loop: str, args) -> dict:
    """``kv``, ``kv_sparsity`` (0: dense cache) and ``kv_bytes`` of the cache after the
    last timed generation (the prompt and all new tokens but the last)."""
    if last.get("kv"):  # the lean loop's sparse cache counts its own bytes
        s = last["kv"]
        return {
            "kv": s,
            "kv_sparsity": (s["k_sparsity"] + s["v_sparsity"]) / 2,
            "kv_bytes": last["kv_bytes"],
            "kv_dense_bf16_bytes": last["kv_dense_bytes"],
        }
    if last.get("kv_bytes"):  # the lean loop's dense cache
        return {"kv": None, "kv_sparsity": 0.0, "kv_bytes": last["kv_bytes"]}
    from transformers import AutoConfig

    from sparamx.cpu import resolve_compute_dtype
    from sparamx.models import resolve_source

    tokens = (args.context or last.get("prompt_tokens") or 0) + args.new_tokens - 1
    # llama.cpp's default cache is f16; transformers' holds the compute dtype
    wide = loop != "llama.cpp" and resolve_compute_dtype(args.dtype).resolved == "float32"
    config = AutoConfig.from_pretrained(resolve_source(args.dense)[0])
    return {
        "kv": None,
        "kv_sparsity": 0.0,
        "kv_bytes": dense_kv_bytes(config, tokens, 4 if wide else 2),
    }


def _context_ids(args):
    """The ``--context`` prompt: ``[1, N]`` ids of real text (sparamx.pipeline.bench)."""
    from transformers import AutoTokenizer

    from sparamx.models import resolve_source
    from sparamx.pipeline.bench import context_prompt

    return context_prompt(
        AutoTokenizer.from_pretrained(resolve_source(args.dense)[0]), args.context
    )


def _n_ctx(args) -> int:
    """llama.cpp's context: the prompt and the new tokens, with room to spare."""
    return max(1024, (args.context or 0) + args.new_tokens + 64)


# --------------------------------------------------------------------- main


def run_subprocess(engine: str, threads: int, args, artifact: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--threads", str(threads)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--dtype", args.dtype, "--kv", json.dumps(args.kv)]
    if args.context:
        cmd += ["--context", str(args.context)]
    cmd += ["--dense", args.dense] + (["--artifact", artifact] if artifact else [])
    for p in args.prompts:
        cmd += ["--prompt", p]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    retried = False
    if proc.returncode == -signal.SIGSEGV and ENGINES[engine][1] == "llama.cpp":
        env[NO_REPACK_ENV], retried = "1", True
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        why = f"exit status {proc.returncode}\n{proc.stderr[-1500:]}"
        return {"engine": engine, "threads": threads, "artifact": artifact, "failed": why}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    if ENGINES[engine][1] == "llama.cpp":
        rec["llama_cpp_repack"] = not retried
    return rec


def _same_tokens(a: str, b: str, eos: str | None) -> bool:
    if eos:
        a, b = a.split(eos)[0], b.split(eos)[0]
    return a == b


def mark_same_tokens(records: list[dict], eos: str | None) -> None:
    """``same_as_hf``: lean texts == ``model.generate`` texts on the same model/threads."""
    by_key = {(r["engine"], r["threads"], r.get("artifact")): r for r in records}
    for r in records:
        ref = by_key.get((SAME_AS.get(r["engine"]), r["threads"], r.get("artifact")))
        if ref and "texts" in r and "texts" in ref:
            pairs = zip(r["texts"], ref["texts"], strict=True)
            r["same_as_hf"] = all(_same_tokens(a, b, eos) for a, b in pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Decode speed: sparamx vs transformers vs llama.cpp")
    ap.add_argument("--artifact", nargs="+", default=[], help="packed artifact dirs")
    ap.add_argument("--dense", default="smollm2-135m", help="dense model source")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", dest="prompts", action="append", default=None)
    ap.add_argument(
        "--context", type=int, default=None, help="prompt: the first N tokens of real text"
    )
    ap.add_argument(
        "--kv",
        type=json.loads,
        default=DEFAULT_KV,
        help="sparse KV settings of sparamx-lean-kv (JSON, kv.KVSettings fields)",
    )
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype (auto: float32 where the CPU has no fast bf16 matmul)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.prompts = args.prompts or DEFAULT_PROMPTS
    if args.worker:
        args.threads = args.threads[0]
        print(json.dumps(run_worker(args.worker, args)))
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engines {unknown}; known: {', '.join(ENGINES)}")
    if not args.artifact and any(ENGINES[e][0] == "packed" for e in engines):
        ap.error("the packed engines need --artifact (or leave them out with --engines)")
    records = []
    for threads in args.threads:
        for engine in engines:
            packed = ENGINES[engine][0] == "packed"
            for artifact in args.artifact if packed else [None]:
                rec = run_subprocess(engine, threads, args, artifact)
                records.append(rec)
                if "skipped" in rec:
                    print(f"{engine}: skipped: {rec['skipped']}", file=sys.stderr)
                elif "failed" in rec:
                    print(f"{engine} ({threads} threads) failed:\n{rec['failed']}", file=sys.stderr)
    mark_same_tokens(records, eos=_eos_text(args))
    from sparamx.pipeline.bench import thread_scaling_flags

    thread_scaling_flags(
        [r for r in records if r["engine"] == "transformers"],
        key=lambda r: r["engine"],
        what="transformers baseline",
    )
    done = [
        {
            **r,
            "model_mb": r["model_bytes"] / 1e6,
            "kv_mb": (r.get("kv_bytes") or 0) / 1e6,
            "context": str(r.get("context") or "-"),
            "same": {True: "yes", False: "NO"}.get(r.get("same_as_hf"), "-"),
            "flag": "!" if r.get("flags") else "",
        }
        for r in records
        if "tokens_per_s" in r
    ]
    print_table(
        done,
        [
            ("engine", "engine", "s"),
            ("format", "format", "s"),
            ("threads", "threads", "d"),
            ("context", "context", "s"),
            ("kv_sparsity", "KV sparsity", ".0%"),
            ("kv_mb", "KV MB", ".1f"),
            ("tokens_per_s", "tokens/s", ".1f"),
            ("ms_per_token", "ms/token", ".1f"),
            ("ttft_ms", "TTFT ms", ".0f"),
            ("compile_s", "compile s", ".0f"),
            ("model_mb", "model MB", ".0f"),
            ("same", "same tokens as HF", "s"),
            ("ms_min", "ms min", ".1f"),
            ("ms_max", "ms max", ".1f"),
            ("flag", "!", "s"),
        ],
    )
    print_flags(done, lambda r: f"{r['engine']} {r['format']} {r['threads']} thr")
    if args.json:
        payload = {
            "environment": environment(),
            "load_avg": os.getloadavg(),
            "prompts": args.prompts if not args.context else None,
            "context": args.context,
            "records": records,
        }
        write_json(args.json, payload)
    return 0


def _eos_text(args) -> str | None:
    try:
        from transformers import AutoTokenizer

        from sparamx.models import resolve_source

        return AutoTokenizer.from_pretrained(resolve_source(args.dense)[0]).eos_token
    except Exception:  # only used to trim texts for the comparison
        return None


if __name__ == "__main__":
    sys.exit(main())
