"""``python -m eval PATH --tasks a,b``: lm-eval on a model, table on stdout, JSON out.

PATH: a HF model directory, a ``.gguf`` file, ``smollm2-135m``, a hub id, or a packed
sparamx artifact (a directory with ``sparamx.json``). Prints lm-eval's table and, with
``--output``, writes the ``evaluate`` dict (``results``: task -> metric -> value, as
lm-eval names them) as JSON, atomically. Exit status 2 on a bad task, model or data.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .data import DataError
from .loading import ModelLoadError, load_for_eval
from .registry import UnknownTaskError
from .runner import (
    EmptyTaskError,
    TaskLoadError,
    evaluate,
    resolve_tasks,
    results_table,
    write_json,
)

log = logging.getLogger("eval")

DEFAULT_TASKS = "lee_news_ppl,word_analogy_mc"


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be positive, got {text}")
    # lm-eval reads a float below 1 as a fraction of each task, an int as a count.
    return int(value) if value.is_integer() else value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0])
    p.add_argument(
        "path",
        help="HF model dir, .gguf file, smollm2-135m, hub id, or a "
        "packed sparamx artifact dir (has sparamx.json)",
    )
    p.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"comma-separated lm-eval task names (default: {DEFAULT_TASKS})",
    )
    p.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="documents per task (a float < 1: fraction); default: all",
    )
    p.add_argument(
        "--batch-size", default="8", help="lm-eval batch size: an int or 'auto' (default 8)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype (default auto: float32 where the CPU has no fast bf16 matmul, "
        "else bfloat16; see sparamx.cpu); a packed artifact's weights stay bf16",
    )
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("-v", "--verbose", action="store_true", help="show lm-eval's own logs")
    args = p.parse_args(argv)
    if args.batch_size != "auto" and not args.batch_size.isdigit():
        p.error(f"--batch-size must be an int or 'auto', got {args.batch_size!r}")
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.INFO)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        # Tasks first: a typo in --tasks should not wait for the model to load.
        tasks = resolve_tasks(args.tasks)
        from sparamx.cpu import resolve_compute_dtype

        dtype = resolve_compute_dtype(args.dtype)
        log.info("compute dtype %s (%s)", dtype.resolved, dtype.reason)
        model, tokenizer = load_for_eval(args.path, dtype.resolved)
        out = evaluate(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)
    except (ModelLoadError, UnknownTaskError, EmptyTaskError, DataError, TaskLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["meta"]["source"] = str(args.path)
    print(results_table(out))
    if args.output:
        log.info("results written to %s", write_json(args.output, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
