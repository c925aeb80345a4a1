"""``python -m sparamx.tools.demo ARTIFACT``: stock transformers and the packed sparse model
generate the same prompt side by side in the terminal, with live tokens/s and the
speed-up.

    python -m sparamx.tools.demo runs/smollm2-135m-wanda50/pack/artifact --threads 2
    python -m sparamx.tools.demo ARTIFACT --prompt "Explain why the sky is blue." --tokens 96
    python -m sparamx.tools.demo ARTIFACT --no-stock        # the sparse model alone
    python -m sparamx.tools.demo ARTIFACT --no-live         # no animation: final texts + speeds

Left: the artifact's source model, dense bf16, through transformers' ``model.generate``
(what a user runs without sparamx). Right: the packed model through
``sparamx.generate``. Both run greedy decoding in one process with the same thread
count, taking turns token by token (a baton passed between two threads): the columns
grow together, and each model's tokens/s counts only the time it held the CPU, so the
two never slow each other down. The first token (prefill) is not in the tokens/s; the
sparse decode step is compiled before the race starts (its compile time is shown).
"""

from __future__ import annotations

import argparse
import sys
import threading
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


class Baton:
    """Turn-taking between the two generating threads: a thread computes while it holds
    the baton and hands it over after each token, so both columns advance together and
    neither's timing includes the other's work."""

    def __init__(self, order: list[str]):
        self.order = order
        self.turn = order[0]
        self.finished: set[str] = set()
        self.cond = threading.Condition()

    def wait(self, who: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == who or self._others_done(who))

    def _others_done(self, who: str) -> bool:
        return all(o in self.finished for o in self.order if o != who)

    def pass_on(self, who: str) -> None:
        with self.cond:
            others = [o for o in self.order if o != who and o not in self.finished]
            if others:
                self.turn = others[0]
            self.cond.notify_all()

    def finish(self, who: str) -> None:
        with self.cond:
            self.finished.add(who)
            self.cond.notify_all()
        self.pass_on(who)


class _Racer:
    """Per-lane bookkeeping shared by the stock streamer and the sparse callback: on each
    new piece of text, charge the time since this lane got the baton, hand it over, and
    wait for the next turn."""

    def __init__(self, lane: Lane, who: str, baton: Baton, on_change: Callable[[], None]):
        self.lane, self.who, self.baton, self.on_change = lane, who, baton, on_change
        self.started = 0.0

    def begin(self) -> None:
        self.baton.wait(self.who)
        self.started = time.perf_counter()

    def token(self, piece: str) -> None:
        self.lane.durations.append(time.perf_counter() - self.started)
        self.lane.text += piece
        self.on_change()
        self.baton.pass_on(self.who)
        self.begin()


class _StockStreamer:
    """A transformers streamer (``put``/``end``) turning token ids into text pieces."""

    def __init__(self, tokenizer, racer: _Racer):
        self.tokenizer, self.racer = tokenizer, racer
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[self.sent :] if not text.endswith("\ufffd") else ""
        self.sent += len(piece)
        self.racer.token(piece)

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
    """Generate ``prompt`` with both models, turn by turn (see the module docstring);
    ``dense`` None: the sparse model alone."""
    from ..generate import CACHE_BUCKET, generate

    torch.set_num_threads(threads)
    if lanes is None:
        lanes = {SPARSE: Lane("sparamx packed")}
        if dense is not None:
            lanes[STOCK] = Lane("stock transformers")
    order = [STOCK, SPARSE] if dense is not None else [SPARSE]
    baton = Baton(order)
    ids = tokenizer(prompt, return_tensors="pt")
    cache_len = -(-(ids["input_ids"].shape[1] + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET

    def run_stock():
        racer = _Racer(lanes[STOCK], STOCK, baton, on_change)
        try:
            torch.set_num_threads(threads)  # the thread count is per OS thread in OpenMP
            racer.begin()
            with torch.inference_mode():
                dense.generate(
                    **ids,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    streamer=_StockStreamer(tokenizer, racer),
                    pad_token_id=tokenizer.pad_token_id,
                )
        except Exception as e:  # noqa: BLE001 - shown in its column, the other lane goes on
            lanes[STOCK].error = f"{type(e).__name__}: {e}"
        finally:
            lanes[STOCK].done = True
            baton.finish(STOCK)
            on_change()

    worker = None
    if dense is not None:
        worker = threading.Thread(target=run_stock, name="stock-generate", daemon=True)
        worker.start()
    # The sparse model runs in the main thread (torch.compile's home).
    racer = _Racer(lanes[SPARSE], SPARSE, baton, on_change)
    try:
        racer.begin()
        generate(
            sparse,
            tokenizer,
            prompt,
            new_tokens,
            stream=racer.token,
            max_cache_len=cache_len,
            compile=compile,
        )
    finally:
        lanes[SPARSE].done = True
        baton.finish(SPARSE)
        on_change()
    if worker is not None:
        worker.join()
    return lanes


def warm_up(sparse, dense, tokenizer, prompt: str, new_tokens: int, compile: bool = True) -> float:
    """Compile the sparse decode step for the race's cache length and run each model
    once, outside the clock; returns the sparse compile seconds."""
    from ..generate import CACHE_BUCKET, generate

    n = tokenizer(prompt, return_tensors="pt")["input_ids"].shape[1]
    cache_len = -(-(n + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    out = generate(sparse, tokenizer, prompt, 2, max_cache_len=cache_len, compile=compile)
    if dense is not None:
        with torch.inference_mode():
            dense.generate(
                **tokenizer(prompt, return_tensors="pt"),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
    return out.compile_s


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
