"""The ``sparamx`` command: one entry point for the pipeline and the tools around it.

    sparamx run CONFIG [--set k=v ...] [--out DIR] [--only STAGE] [--force STAGE]
    sparamx eval ARTIFACT --tasks a,b [--limit N]
    sparamx bench --artifact ARTIFACT --threads 2 [--engine lean]
    sparamx sweep SWEEP.yaml [--plan | --from-csv F | --resume DIR | --report DIR]
    sparamx demo ARTIFACT [--threads 2] [--no-stock]
    sparamx generate ARTIFACT "prompt" [--max-new-tokens N] [--threads T] [--attention fast]
    sparamx info [--json]
    sparamx check ARTIFACT [--json]
    sparamx export ARTIFACT OUT [--max-shard-gb G]
    sparamx serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--threads T]

``run``, ``eval``, ``bench``, ``sweep``, ``export``, ``demo`` and ``serve`` hand their
arguments unchanged to the ``main(argv)`` of ``sparamx.pipeline.runner``, ``eval``,
``sparamx.pipeline.bench``, ``sparamx.sweep.runner``, ``sparamx.export``,
``sparamx.tools.demo`` and ``sparamx.serve.app`` (so ``python -m sparamx.pipeline`` and
``python -m eval`` take the same flags); ``generate``, ``info`` and ``check`` live here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from . import __version__

# kernel_info() keys that name the kernel a path uses (those present are shown)
KERNEL_PATHS = ("decode", "prefill", "attention", "norm")
ARTIFACT_HINT = "make one with `sparamx run CONFIG` (it is the run's pack/artifact directory)"


@dataclass(frozen=True)
class Delegate:
    """A subcommand whose arguments go, unparsed, to another module's ``main(argv)``."""

    module: str  # module holding main(argv) -> int
    prog: str | None  # the prog its parser names itself with (None: from sys.argv[0])
    help: str
    example: str

    def main(self) -> Callable[[Sequence[str]], int]:
        return import_module(self.module).main


DELEGATES = {
    "run": Delegate(
        "sparamx.pipeline.runner",
        "python -m sparamx.pipeline",
        "the pipeline: load, calibrate, prune, eval, pack, verify, eval-packed, bench, report",
        "sparamx run configs/smollm2-135m.yaml --set prune.sparsity=0.7 --out runs/wanda70\n"
        "  sparamx run configs/smollm2-135m.yaml --force bench",
    ),
    "eval": Delegate(
        "eval.__main__",
        "python -m eval",
        "lm-eval on a packed artifact (or any model the pipeline can load)",
        "sparamx eval runs/smollm2-135m-wanda50/pack/artifact "
        "--tasks lee_news_ppl,word_analogy_mc --limit 50",
    ),
    "bench": Delegate(
        "sparamx.pipeline.bench",
        None,
        "timed greedy generation of a stock model or a packed artifact",
        "sparamx bench --artifact runs/smollm2-135m-wanda50/pack/artifact --threads 2 "
        "--engine lean",
    ),
    "sweep": Delegate(
        "sparamx.sweep.runner",
        "python -m sparamx.sweep",
        "a grid of pipeline runs, one results row each, with plots and a summary",
        "sparamx sweep configs/sweeps/smollm2-135m.yaml --plan\n"
        "  sparamx sweep --resume experiment_results/2026-11-27_18-00-00",
    ),
    "export": Delegate(
        "sparamx.export",
        "sparamx export",
        "write a packed artifact as a standard Hugging Face checkpoint (weights densified)",
        "sparamx export runs/smollm2-135m-wanda50/pack/artifact hf/smollm2-135m-wanda50\n"
        '  python -c "from transformers import AutoModelForCausalLM as M; '
        "M.from_pretrained('hf/smollm2-135m-wanda50')\"",
    ),
    "demo": Delegate(
        "sparamx.tools.demo",
        "python -m sparamx.tools.demo",
        "stock transformers and the packed model generating side by side",
        "sparamx demo runs/smollm2-135m-wanda50/pack/artifact --threads 2 --tokens 96",
    ),
    "serve": Delegate(
        "sparamx.serve.app",
        "python -m sparamx.serve",
        "an OpenAI-compatible HTTP server for a packed artifact (chat, completions, streaming)",
        "sparamx serve runs/smollm2-135m-wanda50/pack/artifact --port 8000 --threads 2\n"
        "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "smollm2-135m-wanda50", "messages": '
        '[{"role": "user", "content": "Hi"}]}\'',
    ),
}

GENERATE_EXAMPLE = (
    'sparamx generate runs/smollm2-135m-wanda50/pack/artifact "The history of the printing '
    'press begins" --max-new-tokens 64 --threads 2'
)
INFO_EXAMPLE = "sparamx info --json | python -m json.tool\n  sparamx info"
CHECK_EXAMPLE = "sparamx check runs/smollm2-135m-wanda50/pack/artifact && echo intact"


def _examples(text: str) -> str:
    return f"example:\n  {text}"


# ------------------------------------------------------------------ delegation


def _retitle_help(text: str, old_prog: str | None, new_prog: str) -> str:
    """The delegate's help with its prog replaced by ``new_prog``; wrapped usage lines are
    re-indented to the new prog's width."""
    if old_prog is None or old_prog == new_prog:
        return text
    old_indent = " " * len(f"usage: {old_prog} ")
    new_indent = " " * len(f"usage: {new_prog} ")
    lines = text.replace(old_prog, new_prog).split("\n")
    for i, line in enumerate(lines):
        if i == 0:
            continue
        if not line.startswith(old_indent):
            break  # the usage block ends at the first line not indented under it
        lines[i] = new_indent + line[len(old_indent) :]
    return "\n".join(lines)


def run_delegate(name: str, argv: Sequence[str]) -> int:
    """Run subcommand ``name`` through its module's ``main(argv)``. With ``-h``/``--help``
    prints that parser's help under ``sparamx NAME``, plus an example."""
    spec = DELEGATES[name]
    prog = f"sparamx {name}"
    argv = list(argv)
    old_argv0 = sys.argv[0]
    sys.argv[0] = prog  # the prog of a parser that does not name one
    try:
        if "-h" in argv or "--help" in argv:
            buf = io.StringIO()
            with redirect_stdout(buf):
                try:
                    spec.main()(["--help"])
                except SystemExit:
                    pass
            print(_retitle_help(buf.getvalue(), spec.prog, prog).rstrip("\n"))
            print()
            print(_examples(spec.example))
            return 0
        return int(spec.main()(argv) or 0)
    finally:
        sys.argv[0] = old_argv0


# -------------------------------------------------------------------- generate


def _check_artifact_dir(path: Path) -> str | None:
    """Why ``path`` cannot be a packed artifact (cheap checks, before any model code)."""
    if not path.exists():
        return f"artifact {path}: no such directory; {ARTIFACT_HINT}"
    if not path.is_dir():
        return f"artifact {path}: not a directory (an artifact is a directory); {ARTIFACT_HINT}"
    if not (path / "sparamx.json").is_file():
        return f"artifact {path}: not a sparamx artifact (no sparamx.json); {ARTIFACT_HINT}"
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    """Load the artifact, stream the greedy continuation of the prompt to stdout, and
    print the speed to stderr."""
    path = Path(args.artifact)
    if why := _check_artifact_dir(path):
        print(f"sparamx generate: error: {why}", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        print("sparamx generate: error: the prompt is empty", file=sys.stderr)
        return 2

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .artifact import ArtifactError, load
    from .generate import generate

    try:
        model, tokenizer = load(path)
    except ArtifactError as e:
        print(f"sparamx generate: error: {e}", file=sys.stderr)
        return 2

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = generate(
        model,
        tokenizer,
        prompt,
        args.max_new_tokens,
        stream=write,
        compile=not args.no_compile,
        attention=args.attention,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    speed = f"{out.tokens_per_s:.1f} tokens/s" if out.tokens_per_s else "one token"
    compiled = f", compile {out.compile_s:.1f} s" if out.compile_s else ""
    print(
        f"[{len(out.ids)} tokens ({out.stop_reason}), {speed}, TTFT {out.ttft_s * 1e3:.0f} ms"
        f"{compiled}; {torch.get_num_threads()} threads, attention {args.attention}]",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------ info


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return import_module(module).__version__
    except (ImportError, AttributeError):
        return None


def collect_info() -> dict:
    """CPU, detected ISA features, the kernel per path, and versions (JSON-ready)."""
    import torch

    info: dict = {
        "cpu": {
            "model": cpu_model(),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "sparamx": __version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
        },
    }
    try:
        from .ops import kernel_info
    except ImportError as e:
        info["native"] = {"built": False, "error": str(e)}
        return info
    kinfo = kernel_info()
    flags = kinfo.get("cpu", {})
    info["isa"] = {
        "detected": sorted(k for k, v in flags.items() if v is True),
        "missing": sorted(k for k, v in flags.items() if v is False),
    }
    info["native"] = {"built": True, "compiled": list(kinfo.get("compiled", []))}
    info["kernels"] = {path: kinfo[path] for path in KERNEL_PATHS if path in kinfo}
    info["forced"] = kinfo.get("forced")  # SPARAMX_KERNEL, None: automatic choice
    info["kernel_info"] = kinfo  # all of sparamx.kernel_info(), as it is
    return info


def format_info(info: dict) -> str:
    v, cpu = info["versions"], info["cpu"]
    rows = [
        ("sparamx", v["sparamx"]),
        ("torch", v["torch"]),
        ("transformers", v["transformers"] or "not installed"),
        ("python", v["python"]),
        (
            "cpu",
            f"{cpu['model']} ({cpu['machine']}, {cpu['cores']} cores; "
            f"torch uses {cpu['torch_threads']} threads)",
        ),
    ]
    native = info["native"]
    if not native["built"]:
        rows.append(("native", f"not built: {native['error']}"))
    else:
        rows += [
            ("isa", " ".join(info["isa"]["detected"]) or "none detected"),
            ("isa missing", " ".join(info["isa"]["missing"]) or "none"),
            ("compiled", " ".join(native["compiled"])),
        ]
        rows += [(f"kernel {path}", str(kernel)) for path, kernel in info["kernels"].items()]
        forced = info["forced"]
        rows.append(("SPARAMX_KERNEL", f"{forced} (forced)" if forced else "unset (automatic)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


# ----------------------------------------------------------------------- check


def format_check(s: dict) -> str:
    mb = 1 << 20
    if s["checksums"] == "verified":
        sums = f"verified: {s['tensors']} tensors, {s['checked_files']} metadata files, manifest"
    else:
        sums = (
            f"absent (written by sparamx {s['package_version']} before artifacts carried "
            "them): sizes, shapes and bitmap invariants checked only; re-save to add them"
        )
    packed = s["packed_bytes"]
    dense = s["dense_bytes"]
    ratio = f" ({packed / dense:.0%} of dense bf16)" if packed and dense else ""
    rows = [
        ("artifact", s["path"]),
        ("format", f"version {s['format_version']}, written by sparamx {s['package_version']}"),
        ("model", f"{s['model_type']}, kv cache {s['kv']}"),
        (
            "layers",
            f"{s['layers']} packed ({s['bitmap_layers']} bitmap, {s['dense_layers']} dense){ratio}",
        ),
        (
            "files",
            f"{len(s['files'])} safetensors, {s['bytes'] / mb:.1f} MiB, {s['tensors']} tensors",
        ),
        ("checksums", sums),
        ("generation", "loads and generates, logits finite"),
        ("result", f"OK in {s['seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate an artifact; exit 0 when intact, 1 on any problem (printed to stderr)."""
    path = Path(args.artifact)
    if why := _check_artifact_dir(path):
        print(f"sparamx check: error: {why}", file=sys.stderr)
        return 1
    import logging

    logging.basicConfig(level=logging.ERROR)
    from .artifact import ArtifactError, check

    try:
        summary = check(path)
    except ArtifactError as e:
        print(f"sparamx check: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if args.json else format_check(summary))
    return 0


# ---------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sparamx",
        description="Unstructured-sparse LLM decoding on CPUs: prune, evaluate, pack, run.",
        epilog=_examples(
            "sparamx run configs/smollm2-135m.yaml\n"
            '  sparamx generate runs/smollm2-135m-wanda50/pack/artifact "Once upon a time"\n'
            "  sparamx COMMAND --help"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"sparamx {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in DELEGATES.items():
        # Listed here for --help; their arguments are parsed by their own modules.
        sub.add_parser(name, help=spec.help, add_help=False)

    gen = sub.add_parser(
        "generate",
        help="stream a greedy continuation of a prompt from a packed artifact",
        description="Load a packed artifact and stream the greedy continuation of PROMPT to\n"
        "stdout (sparamx.generate: static KV cache, compiled decode step). The speed\n"
        "goes to stderr.",
        epilog=_examples(GENERATE_EXAMPLE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("artifact", help="packed artifact directory (a run's pack/artifact)")
    gen.add_argument("prompt", help="prompt text ('-': read it from stdin)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64, help="default 64")
    gen.add_argument("--threads", type=_positive_int, default=None, help="default: torch's")
    gen.add_argument(
        "--attention",
        choices=("exact", "fast"),
        default="exact",
        help="exact: tokens bitwise model.generate's; fast: our decode attention kernel",
    )
    gen.add_argument(
        "--no-compile", action="store_true", help="eager decode step (no compile wait)"
    )
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser(
        "info",
        help="CPU, detected ISA features, kernel per path, versions",
        description="What sparamx sees on this machine: the CPU model, the ISA features\n"
        "detected at run time, the kernels compiled in and the one each path uses\n"
        "(SPARAMX_KERNEL forces one), and the versions of sparamx, torch and transformers.",
        epilog=_examples(INFO_EXAMPLE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    chk = sub.add_parser(
        "check",
        help="validate a packed artifact (checksums, format invariants, a generation step)",
        description="Validate everything in a packed artifact: the manifest and its checksum,\n"
        "the checksum of every tensor and metadata file, sizes, shapes, dtypes, offsets\n"
        "against bitmap popcounts, the config and tokenizer, and one greedy generation\n"
        "step (finite logits). An artifact written before checksums existed gets every\n"
        "check but those, and says so. Exit status 0: intact; 1: a problem, named on stderr.",
        epilog=_examples(CHECK_EXAMPLE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk.add_argument("artifact", help="packed artifact directory (a run's pack/artifact)")
    chk.add_argument("--json", action="store_true", help="print the summary as JSON")
    chk.set_defaults(func=cmd_check)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATES:
            return run_delegate(argv[0], argv[1:])
        ap = build_parser()
        args = ap.parse_args(argv)
        if args.command is None:
            ap.print_help(sys.stderr)
            return 2
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`sparamx info | head -1`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
