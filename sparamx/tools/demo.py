"""``python -m sparamx.tools.demo ARTIFACT``: stock transformers and the packed sparse model
generate the same prompt side by side in the terminal, with live tokens/s and the
speed-up.

    python -m sparamx.tools.demo runs/smollm2-135m-wanda50/pack/artifact --threads 2
    python -m sparamx.tools.demo ARTIFACT --prompt "Explain why the sky is blue." --tokens 96
    python -m sparamx.tools.demo ARTIFACT --no-stock        # the sparse model alone
    python -m sparamx.tools.demo ARTIFACT --no-live         # no animation: final texts + speeds

Left: the artifact's source model, dense bf16, through transformers' ``model.generate``
(what a user runs without sparamx). Right: the packed model through sparamx's decoder
(``sparamx.BatchDecoder`` with one slot: a compiled decode step, one token per call).
Both run greedy decoding on the calling thread with the same thread count, taking turns
token by token: the stock model's streamer runs one sparse step after each stock token,
so the columns grow together, and each model's tokens/s counts only its own time. (Two
Python threads would each get their own OpenMP thread team, which made both lanes
1.5-1.8x slower at 2 threads on a 2-core AMX Xeon; see ``sparamx.serve.engine``.) The
first token (prefill) is not in the tokens/s; the sparse decode step is compiled before
the race starts (its compile time is shown).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_PROMPT = "The history of the printing press begins"
STOCK, SPARSE = "stock", "sparse"


@dataclass
class Lane:
    """One column: its title, the text so far and when each token arrived."""

    title: str
    text: str = ""
    durations: list[float] = field(default_factory=list)  # CPU-holding time per token
    done: bool = False
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.durations)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate over tokens 2..n (the first one includes the prefill)."""
        rest = self.durations[1:]
        return len(rest) / sum(rest) if rest and sum(rest) > 0 else None


class _SparseLane:
    """The packed model's column, one token per ``next()`` (prefill and first token on
    the first call), timed on its own."""

    def __init__(self, decoder, prompt: str, new_tokens: int, lane: Lane, on_change):
        self.decoder, self.prompt, self.new_tokens = decoder, prompt, new_tokens
        self.lane, self.on_change = lane, on_change
        self.seq = None

    def _piece(self, text: str) -> None:
        self.lane.text += text

    def next(self) -> bool:
        """One more token; False once the sequence has ended."""
        if self.lane.done:
            return False
        t0 = time.perf_counter()
        try:
            if self.seq is None:
                self.seq = self.decoder.add(self.prompt, self.new_tokens, stream=self._piece)
            else:
                self.decoder.step()
        except Exception as e:  # noqa: BLE001 - shown in its column, the other lane goes on
            self.lane.error, self.lane.done = f"{type(e).__name__}: {e}", True
            self.on_change()
            return False
        self.lane.durations.append(time.perf_counter() - t0)
        self.lane.done = self.seq.result is not None
        self.on_change()
        return not self.lane.done


class _StockStreamer:
    """A transformers streamer (``put``/``end``) for the stock column: each new token is
    charged the time since the stock model last resumed, then the sparse lane takes its
    turn (``turn``), then the stock model resumes."""

    def __init__(self, tokenizer, lane: Lane, turn: Callable[[], bool], on_change):
        self.tokenizer, self.lane, self.turn, self.on_change = tokenizer, lane, turn, on_change
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.resumed = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.lane.durations.append(time.perf_counter() - self.resumed)
        self.ids.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[self.sent :] if not text.endswith("\ufffd") else ""
        self.sent += len(piece)
        self.lane.text += piece
        self.on_change()
        self.turn()
        self.resumed = time.perf_counter()

    def end(self) -> None:
        pass


def load_models(artifact: str | Path, stock: bool, stock_source: str | None, dtype: str):
    """(sparse model, tokenizer, stock model or None, description of the artifact)."""
    from ..artifact import load, read_manifest
    from ..models import load_model

    manifest = read_manifest(artifact)
    sparse, tok = load(artifact, dtype=dtype)
    recipe = manifest.get("recipe") or {}
    desc = f"{recipe.get('method', '?')} {recipe.get('sparsity', 0):.0%}"
    dense = None
    if stock:
        source = stock_source or (manifest.get("source") or {}).get("source")
        if not source:
            raise SystemExit(
                f"{artifact}: the manifest does not name its source model; pass --stock-source"
            )
        dense, _ = load_model(source, dtype=dtype)
    return sparse, tok, dense, desc


def _cache_len(tokenizer, prompt: str, new_tokens: int) -> int:
    from ..generate import CACHE_BUCKET

    n = tokenizer(prompt, return_tensors="pt")["input_ids"].shape[1]
    return -(-(n + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET


def sparse_decoder(sparse, tokenizer, prompt: str, new_tokens: int, compile: bool = True):
    """The packed model's one-slot ``BatchDecoder`` for this prompt, kept on the model
    so that the warm-up's compiled step serves the race."""
    from ..batch import BatchDecoder

    key = (_cache_len(tokenizer, prompt, new_tokens), compile)
    cached = getattr(sparse, "_sparamx_demo_decoder", None)
    if cached is None or cached[0] != key:
        dec = BatchDecoder(sparse, tokenizer, slots=1, max_len=key[0], compile=compile)
        sparse._sparamx_demo_decoder = cached = (key, dec)
    return cached[1]


def race(
    sparse,
    dense,
    tokenizer,
    prompt: str,
    new_tokens: int,
    threads: int,
    on_change: Callable[[], None] = lambda: None,
    lanes: dict[str, Lane] | None = None,
    compile: bool = True,
) -> dict[str, Lane]:
    """Generate ``prompt`` with both models on this thread, turn by turn (see the
    module docstring); ``dense`` None: the sparse model alone."""
    torch.set_num_threads(threads)
    if lanes is None:
        lanes = {SPARSE: Lane("sparamx packed")}
        if dense is not None:
            lanes[STOCK] = Lane("stock transformers")
    decoder = sparse_decoder(sparse, tokenizer, prompt, new_tokens, compile)
    sparse_lane = _SparseLane(decoder, prompt, new_tokens, lanes[SPARSE], on_change)
    if dense is not None:
        streamer = _StockStreamer(tokenizer, lanes[STOCK], sparse_lane.next, on_change)
        try:
            with torch.inference_mode():
                dense.generate(
                    **tokenizer(prompt, return_tensors="pt"),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                )
        except Exception as e:  # noqa: BLE001 - shown in its column, the other lane goes on
            lanes[STOCK].error = f"{type(e).__name__}: {e}"
        finally:
            lanes[STOCK].done = True
            on_change()
    while sparse_lane.next():  # the rest of the sparse column (or all of it, alone)
        pass
    return lanes


def warm_up(sparse, dense, tokenizer, prompt: str, new_tokens: int, compile: bool = True) -> float:
    """Compile the sparse decode step for the race's cache length and run each model
    once, outside the clock; returns the sparse warm-up seconds (compile included)."""
    decoder = sparse_decoder(sparse, tokenizer, prompt, new_tokens, compile)
    t0 = time.perf_counter()
    decoder.add(prompt, 3, stop_at_eos=False)
    decoder.run()  # the first step compiles (batch size 1)
    warm = time.perf_counter() - t0
    if dense is not None:
        with torch.inference_mode():
            dense.generate(
                **tokenizer(prompt, return_tensors="pt"),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    return warm


def _speedup(lanes: dict[str, Lane]) -> float | None:
    if STOCK not in lanes:
        return None
    s, d = lanes[SPARSE].tokens_per_s, lanes[STOCK].tokens_per_s
    return s / d if s and d else None


def _rate(lane: Lane) -> str:
    tps = lane.tokens_per_s
    return f"{lane.tokens} tokens, " + ("–" if tps is None else f"{tps:.1f} tokens/s")


def render(lanes: dict[str, Lane], prompt: str, footer: str):
    """The live view: two panels side by side and a line with the speed-up."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(expand=True, padding=(0, 1))
    panels = []
    for key in (STOCK, SPARSE):
        if key not in lanes:
            continue
        lane = lanes[key]
        grid.add_column(ratio=1)
        body = Text(prompt, style="dim") + Text(lane.text)
        if lane.error:
            body += Text(f"\n[error] {lane.error}", style="bold red")
        status = "done" if lane.done else "generating"
        panels.append(
            Panel(
                body,
                title=lane.title,
                subtitle=f"{_rate(lane)} · {status}",
                border_style="green" if key == SPARSE else "blue",
            )
        )
    grid.add_row(*panels)
    sp = _speedup(lanes)
    line = Text(footer)
    if sp is not None:
        line += Text(f" · speed-up {sp:.2f}×", style="bold green")
    return Group(grid, line)


def final_text(lanes: dict[str, Lane], prompt: str, footer: str) -> str:
    """Plain report for --no-live: each model's text and speed, and the speed-up."""
    out = [f"prompt: {prompt}", footer]
    for key in (STOCK, SPARSE):
        if key in lanes:
            lane = lanes[key]
            out += ["", f"== {lane.title}: {_rate(lane)}", lane.text.strip()]
            if lane.error:
                out.append(f"[error] {lane.error}")
    sp = _speedup(lanes)
    if sp is not None:
        out += ["", f"speed-up (sparse / stock tokens/s): {sp:.2f}x"]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m sparamx.tools.demo",
        description="stock transformers vs the packed sparse model, side by side",
    )
    ap.add_argument("artifact", help="packed artifact directory (pipeline: pack/artifact)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per model")
    ap.add_argument("--no-stock", action="store_true", help="the sparse model only")
    ap.add_argument("--no-live", action="store_true", help="print the final texts and speeds")
    ap.add_argument("--stock-source", default=None, help="dense model (default: the source)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="compute dtype of the stock model and of the packed model's activations "
        "(auto: float32 where the CPU has no fast bf16 matmul; see sparamx.cpu)",
    )
    ap.add_argument(
        "--no-compile", action="store_true", help="eager sparse decode step (no compile wait)"
    )
    args = ap.parse_args(argv)
    from ..cpu import resolve_compute_dtype

    args.dtype = resolve_compute_dtype(args.dtype).resolved
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.tokens < 2:
        ap.error(f"--tokens must be >= 2, got {args.tokens}")
    if not args.prompt.strip():
        ap.error("--prompt is empty")
    if not Path(args.artifact).is_dir():
        ap.error(f"artifact {args.artifact} is not a directory")
    return args


def main(argv=None) -> int:
    import logging

    from rich.console import Console
    from rich.live import Live

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    # Weight-loading bars would scroll the side-by-side view off the screen.
    transformers.utils.logging.disable_progress_bar()
    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    with console.status("loading models…"):
        sparse, tok, dense, desc = load_models(
            args.artifact, not args.no_stock, args.stock_source, args.dtype
        )
    from ..ops import kernel_info

    kernel = kernel_info()["decode"]
    lanes = {SPARSE: Lane(f"sparamx packed ({desc}, {kernel} kernel)")}
    if dense is not None:
        lanes = {STOCK: Lane(f"stock transformers ({args.dtype})"), **lanes}
    compile = not args.no_compile
    with console.status("compiling the sparse decode step, warming up…"):
        compile_s = warm_up(sparse, dense, tok, args.prompt, args.tokens, compile)
    footer = f"{args.threads} thread(s), greedy, {args.tokens} new tokens"
    footer += f"; sparse step compiled in {compile_s:.0f} s" if compile else "; eager sparse step"
    run_args = (sparse, dense, tok, args.prompt, args.tokens, args.threads)
    if args.no_live:
        race(*run_args, lanes=lanes, compile=compile)
        print(final_text(lanes, args.prompt, footer))
    else:
        with Live(
            get_renderable=lambda: render(lanes, args.prompt, footer),
            refresh_per_second=12,
            console=Console(),
        ):
            race(*run_args, lanes=lanes, compile=compile)
    return 1 if any(lane.error for lane in lanes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
