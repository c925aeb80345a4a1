"""Load check of the OpenAI-compatible server: N concurrent streaming clients on
loopback, a fixed number of requests, throughput and latency percentiles.

The server (``python -m sparamx.serve``, its own process) and the baseline,
``sparamx.generate`` called directly in this process, run with the same threads,
attention and KV cache length. Each of ``--repeats`` rounds runs, back to back, one
direct generation per prompt and, for each ``--clients`` level, ``--requests``
streaming completions of exactly ``--new-tokens`` tokens (``ignore_eos``) sent by that
many client threads with the official ``openai`` client: on a shared machine the load
changes from minute to minute, and this way every side of a round sees the same.

Per request: TTFT (request sent -> first text chunk), latency (-> last chunk) and
its decode rate (tokens after the first / time after the first). Per level: aggregate
tokens/s (all completion tokens / wall time of the level), the median over rounds;
TTFT and latency p50 / p90 / p99 over all its requests; failed requests (any error,
none expected). The single-stream ratio is, per round, the server's median decode rate
at 1 client over ``sparamx.generate``'s, then the median over rounds (target: >= 90%).
Requests are decoded one at a time (no batched decode yet), so aggregate throughput at
8 clients is about the single-stream rate: latency grows with the queue instead.

    python bench/serve.py --artifact runs/smollm2-135m-wanda50/pack/artifact --threads 2 \\
        --clients 1 8 --requests 8 --json bench/results/serve_smollm2_CPU.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, write_json  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "Explain why the sky is blue in one paragraph.",
]
NAME = "bench"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------- baseline


class Direct:
    """``sparamx.generate`` in this process, the server's settings."""

    def __init__(self, args):
        import torch

        import sparamx

        torch.set_num_threads(args.threads)
        self.sparamx, self.args = sparamx, args
        self.model, self.tok = sparamx.load(args.artifact)
        self.kw = dict(
            compile=not args.no_compile,
            attention=args.attention,
            max_cache_len=args.context,
            stop_at_eos=False,
        )
        self.compile_s = self.generate(PROMPTS[0]).compile_s

    def generate(self, prompt: str):
        return self.sparamx.generate(self.model, self.tok, prompt, self.args.new_tokens, **self.kw)

    def round(self) -> list[float]:
        """Decode tokens/s (tokens 2..n) of one generation per prompt."""
        return [self.generate(p).tokens_per_s for p in PROMPTS]


# ------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sparamx.serve",
        args.artifact,
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--attention",
        args.attention,
        "--context",
        str(args.context),
        "--model-name",
        NAME,
        "--max-queue",
        str(max(args.clients) + 1),
    ]
    if args.no_compile:
        cmd.append("--no-compile")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server was not ready within {args.start_timeout} s")


def one_request(client, prompt: str, new_tokens: int) -> dict:
    """One streaming completion; times to the first and the last text chunk."""
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=new_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            usage = chunk.usage
    n = usage.completion_tokens
    return {
        "ttft_s": first - t0,
        "latency_s": last - t0,
        "tokens": n,
        "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else None,
    }


def load_level(base_url: str, clients: int, args) -> dict:
    """``args.requests`` requests from ``clients`` threads; aggregate and per request."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    failures: list[str] = []
    lock = threading.Lock()

    def run(p):
        try:
            return one_request(client, p, args.new_tokens)
        except Exception as e:  # noqa: BLE001  (counted: a failed request is a result)
            with lock:
                failures.append(f"{type(e).__name__}: {e}")
            return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for r in pool.map(run, prompts) if r is not None]
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tokens": sum(r["tokens"] for r in done),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "requests": done,
        "failed": len(failures),
        "failures": failures[:5],
    }


def summarize(clients: int, runs: list[dict]) -> dict:
    reqs = [r for run in runs for r in run["requests"]]
    ttft = [r["ttft_s"] * 1e3 for r in reqs]
    lat = [r["latency_s"] * 1e3 for r in reqs]
    rates = [r["decode_tokens_per_s"] for r in reqs if r["decode_tokens_per_s"]]
    row = {
        "clients": clients,
        "requests": len(reqs),
        "failed": sum(run["failed"] for run in runs),
        "aggregate_tokens_per_s": statistics.median(r["aggregate_tokens_per_s"] for r in runs),
        "aggregate_runs": [r["aggregate_tokens_per_s"] for r in runs],
        "stream_tokens_per_s": statistics.median(rates) if rates else None,
    }
    for name, xs in (("ttft_ms", ttft), ("latency_ms", lat)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = percentile(xs, q)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=8, help="per level and repeat")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=512, help="KV cache length, both sides")
    ap.add_argument("--attention", choices=("exact", "fast"), default="exact")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not Path(args.artifact, "sparamx.json").is_file():
        ap.error(f"--artifact {args.artifact}: not a sparamx artifact")

    port = _free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}/v1"
    runs: dict[int, list[dict]] = {c: [] for c in args.clients}
    direct_rates: list[list[float]] = []
    try:
        direct = Direct(args)
        load_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 2}))  # warm-up
        # Each repeat measures every side back to back, so all see the same load on a
        # shared machine (it changes from minute to minute).
        for r in range(args.repeats):
            direct_rates.append(direct.round())
            for clients in args.clients:
                runs[clients].append(load_level(url, clients, args))
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    rows = []
    for clients in args.clients:
        rows.append(summarize(clients, runs[clients]))
        rows[-1]["runs"] = runs[clients]
    flat = [x for rnd in direct_rates for x in rnd]
    base = {
        "compile_s": direct.compile_s,
        "decode_tokens_per_s": statistics.median(flat),
        "decode_tokens_per_s_by_repeat": direct_rates,
    }
    print(
        f"sparamx.generate directly: {base['decode_tokens_per_s']:.1f} tokens/s decode "
        f"(median of {len(flat)})"
    )
    single = next((r for r in rows if r["clients"] == 1), None)
    ratio = None
    if single:
        # per repeat (server and direct measured back to back), then the median
        per_repeat = [
            statistics.median(r["decode_tokens_per_s"] for r in run["requests"])
            / statistics.median(d)
            for run, d in zip(single["runs"], direct_rates, strict=True)
        ]
        base["server_vs_direct_by_repeat"] = per_repeat
        ratio = statistics.median(per_repeat)
    for r in rows:
        r["vs_single_stream"] = r["aggregate_tokens_per_s"] / (
            single["aggregate_tokens_per_s"] if single else float("nan")
        )
    print_table(
        rows,
        [
            ("clients", "clients", "d"),
            ("requests", "requests", "d"),
            ("failed", "failed", "d"),
            ("aggregate_tokens_per_s", "agg tok/s", ".1f"),
            ("vs_single_stream", "x 1 client", ".2f"),
            ("stream_tokens_per_s", "stream tok/s", ".1f"),
            ("ttft_ms_p50", "TTFT p50 ms", ".0f"),
            ("ttft_ms_p90", "p90", ".0f"),
            ("ttft_ms_p99", "p99", ".0f"),
            ("latency_ms_p50", "latency p50 ms", ".0f"),
            ("latency_ms_p90", "p90", ".0f"),
            ("latency_ms_p99", "p99", ".0f"),
        ],
    )
    if ratio is not None:
        print(
            f"\nsingle stream through the server: {ratio:.1%} of sparamx.generate's "
            f"decode rate (target >= 90%)"
        )
    if args.json:
        payload = {
            "bench": "serve",
            "artifact": args.artifact,
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "context": args.context,
            "attention": args.attention,
            "compile": not args.no_compile,
            "direct": base,
            "server_vs_direct_single_stream": ratio,
            "levels": rows,
            "environment": environment(args.threads),
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
