"""Load check of the OpenAI-compatible server, beside llama.cpp's: N concurrent
streaming clients on loopback, a fixed number of requests, throughput and latency
percentiles.

Servers (``--servers``, each its own process, all started first and measured in turn):

| name             | what                                                           |
|------------------|----------------------------------------------------------------|
| `sparamx`        | `python -m sparamx.serve ARTIFACT` (continuous batching, 8 slots) |
| `sparamx-slots1` | the same with `--slots 1` (one request at a time)              |
| `llama.cpp-bf16` | `python -m llama_cpp.server`, SmolLM2 GGUF in BF16             |
| `llama.cpp-q4_1` | the same, the shipped Q4_1 GGUF                                |

llama-cpp-python's server (``pip install 'llama-cpp-python[server]'``) decodes one
request at a time (``--interrupt_requests False``: a new request waits instead of
cancelling the running one); ``--llama-no-repack`` runs it with llama.cpp's CPU weight
repacking off (its Q4_1 model crashes with it on an AMX Xeon). The baseline,
``sparamx.generate`` called directly in this process, runs with the same threads,
attention and KV cache length. Each of ``--repeats`` rounds runs, back to back, one
direct generation per prompt and, for each server and each ``--clients`` level,
``--requests`` streaming completions of ``--new-tokens`` tokens sent by that many client
threads with the official ``openai`` client: on a shared machine the load changes from
minute to minute, and this way every side of a round sees the same. Our server gets
``ignore_eos``; llama.cpp's gets a ``logit_bias`` of -100 on the end-of-sequence tokens
(it has no ``ignore_eos``), so both decode the full count.

Per request: TTFT (request sent -> first text chunk), latency (-> last chunk) and
its decode rate (tokens after the first / time after the first). Per server and level:
aggregate tokens/s (all completion tokens / wall time of the level), the median over
rounds; TTFT and latency p50 / p90 / p99 over all its requests; failed requests (any
error, none expected). The single-stream ratio is, per round, our server's median
decode rate at 1 client over ``sparamx.generate``'s, then the median over rounds
(target: >= 90%).

    python bench/serve.py --artifact runs/smollm2-135m-wanda50/pack/artifact --threads 2 \\
        --servers sparamx llama.cpp-bf16 --clients 1 8 --requests 16 \\
        --json bench/results/serve_smollm2_CPU.json
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


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between order statistics; None if empty."""
    xs = sorted(values)
    if not xs:
        return None
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

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tok.eos_token_id if eos is None else eos
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def round(self) -> list[float]:
        """Decode tokens/s (tokens 2..n) of one generation per prompt."""
        return [self.generate(p).tokens_per_s for p in PROMPTS]


# ------------------------------------------------------------------ server

SERVERS = ("sparamx", "sparamx-slots1", "llama.cpp-bf16", "llama.cpp-q4_1")
# llama_cpp.server with llama.cpp's CPU weight repacking off (its Q4_1 model crashes with
# it on a 2-core AMX Xeon), through peers.py's patch.
NO_REPACK_SERVER = f"""
import runpy, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from peers import disable_llama_cpp_repack
disable_llama_cpp_repack()
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, args, port: int) -> list[str]:
    if kind.startswith("sparamx"):
        cmd = [sys.executable, "-m", "sparamx.serve", args.artifact, "--port", str(port)]
        cmd += ["--threads", str(args.threads), "--attention", args.attention]
        cmd += ["--context", str(args.context), "--model-name", NAME]
        cmd += ["--max-queue", str(max(args.clients) + 1)]
        cmd += ["--slots", "1" if kind == "sparamx-slots1" else str(args.slots)]
        return cmd + (["--no-compile"] if args.no_compile else [])
    from sparamx.assets import smollm2_gguf, smollm2_gguf_bf16

    gguf = smollm2_gguf_bf16() if kind == "llama.cpp-bf16" else smollm2_gguf()
    # --llama-no-repack: the same server with use_extra_bufts=False (see peers.py)
    server = ["-c", NO_REPACK_SERVER] if args.llama_no_repack else ["-m", "llama_cpp.server"]
    cmd = [sys.executable, *server, "--model", str(gguf), "--port", str(port)]
    cmd += ["--model_alias", NAME, "--n_threads", str(args.threads)]
    cmd += ["--n_threads_batch", str(args.threads), "--n_ctx", str(args.context)]
    return cmd + ["--interrupt_requests", "False", "--verbose", "False"]


def start_server(kind: str, args) -> tuple[subprocess.Popen, str]:
    """Start one server; returns (process, base url) once ``/v1/models`` answers."""
    port = _free_port()
    proc = subprocess.Popen(
        server_command(kind, args, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200 and _ready(kind, port):
                    return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the {kind} server was not ready within {args.start_timeout} s")


def _ready(kind: str, port: int) -> bool:
    """Ours answers /v1/models while it compiles; /health says when it is done."""
    if not kind.startswith("sparamx"):
        return True
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def extra_body(kind: str, eos_ids: list[int]) -> dict:
    """What makes each server decode exactly ``max_tokens`` tokens."""
    if kind.startswith("sparamx"):
        return {"ignore_eos": True}
    return {"logit_bias": {str(t): -100.0 for t in eos_ids}}


def one_request(client, prompt: str, new_tokens: int, extra: dict) -> dict:
    """One streaming completion; times to the first and the last text chunk. Tokens:
    the usage the server reports, else one per text chunk (llama.cpp streams one
    token per chunk)."""
    t0 = time.perf_counter()
    first = last = None
    usage, chunks = None, 0
    stream = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=new_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            chunks += 1
        if getattr(chunk, "usage", None):
            usage = chunk.usage
    n = usage.completion_tokens if usage else chunks
    return {
        "ttft_s": first - t0,
        "latency_s": last - t0,
        "tokens": n,
        "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 and last > first else None,
    }


def load_level(base_url: str, clients: int, args, extra: dict) -> dict:
    """``args.requests`` requests from ``clients`` threads; aggregate and per request."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    failures: list[str] = []
    lock = threading.Lock()

    def run(p):
        try:
            return one_request(client, p, args.new_tokens, extra)
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


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=["sparamx"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=8, help="per level and repeat")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slots", type=int, default=8, help="our server's --slots")
    ap.add_argument("--context", type=int, default=512, help="KV cache length, all sides")
    ap.add_argument("--attention", choices=("exact", "fast"), default="exact")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--llama-no-repack",
        action="store_true",
        help="llama.cpp servers without CPU weight repacking (use_extra_bufts=False)",
    )
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not Path(args.artifact, "sparamx.json").is_file():
        ap.error(f"--artifact {args.artifact}: not a sparamx artifact")
    return args


def measure(args, direct, urls: dict, extras: dict) -> tuple[dict, list]:
    """Every repeat: the direct baseline, then each server at each client level."""
    runs = {(kind, c): [] for kind in urls for c in args.clients}
    direct_rates: list[list[float]] = []
    for kind, url in urls.items():  # warm-up requests (first-request costs)
        load_level(url, 1, argparse.Namespace(**{**vars(args), "requests": 2}), extras[kind])
    for r in range(args.repeats):
        direct_rates.append(direct.round())
        for kind, url in urls.items():
            for clients in args.clients:
                time.sleep(1.0)  # the previous side's threads stop spinning first
                runs[kind, clients].append(load_level(url, clients, args, extras[kind]))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    return runs, direct_rates


def report_rows(args, runs: dict) -> list[dict]:
    rows = []
    for (kind, clients), level_runs in runs.items():
        rows.append({"server": kind, **summarize(clients, level_runs), "runs": level_runs})
    for r in rows:
        single = next(x for x in rows if x["server"] == r["server"] and x["clients"] == 1)
        if single["aggregate_tokens_per_s"]:
            r["vs_single_stream"] = r["aggregate_tokens_per_s"] / single["aggregate_tokens_per_s"]
        peer = next(
            (x for x in rows if x["server"] == "llama.cpp-bf16" and x["clients"] == r["clients"]),
            None,
        )
        if peer and peer["aggregate_tokens_per_s"]:
            r["vs_llama_cpp_bf16"] = r["aggregate_tokens_per_s"] / peer["aggregate_tokens_per_s"]
    return rows


def single_stream_ratio(runs: dict, direct_rates: list) -> tuple[float | None, list]:
    """Our server's median decode rate at 1 client over sparamx.generate's, per repeat
    (measured back to back), and the median of those."""
    ours = runs.get(("sparamx", 1))
    if not ours:
        return None, []
    per_repeat = []
    for run, d in zip(ours, direct_rates, strict=True):
        rates = [r["decode_tokens_per_s"] for r in run["requests"] if r["decode_tokens_per_s"]]
        if rates:
            per_repeat.append(statistics.median(rates) / statistics.median(d))
    return (statistics.median(per_repeat) if per_repeat else None), per_repeat


TABLE = [
    ("server", "server", "s"),
    ("clients", "clients", "d"),
    ("requests", "requests", "d"),
    ("failed", "failed", "d"),
    ("aggregate_tokens_per_s", "agg tok/s", ".1f"),
    ("vs_single_stream", "x 1 client", ".2f"),
    ("vs_llama_cpp_bf16", "x llama.cpp bf16", ".2f"),
    ("stream_tokens_per_s", "stream tok/s", ".1f"),
    ("ttft_ms_p50", "TTFT p50 ms", ".0f"),
    ("ttft_ms_p90", "p90", ".0f"),
    ("ttft_ms_p99", "p99", ".0f"),
    ("latency_ms_p50", "latency p50 ms", ".0f"),
    ("latency_ms_p90", "p90", ".0f"),
    ("latency_ms_p99", "p99", ".0f"),
]


def main(argv=None) -> int:
    args = parse_args(argv)
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    start_errors: dict[str, str] = {}
    try:
        direct = Direct(args)
        eos = sorted(direct.eos_ids())
        extras = {kind: extra_body(kind, eos) for kind in args.servers}
        for kind in args.servers:
            try:
                procs[kind], urls[kind] = start_server(kind, args)
            except RuntimeError as e:
                start_errors[kind] = str(e)
                print(f"{kind}: {e}", file=sys.stderr)
        runs, direct_rates = measure(args, direct, urls, extras)
    finally:
        # a server that died during the run (e.g. a crash on its first request)
        exits = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    rows = report_rows(args, runs)
    flat = [x for rnd in direct_rates for x in rnd]
    ratio, per_repeat = single_stream_ratio(runs, direct_rates)
    base = {
        "compile_s": direct.compile_s,
        "decode_tokens_per_s": statistics.median(flat),
        "decode_tokens_per_s_by_repeat": direct_rates,
        "server_vs_direct_by_repeat": per_repeat,
    }
    print(
        f"sparamx.generate directly: {base['decode_tokens_per_s']:.1f} tokens/s decode "
        f"(median of {len(flat)})"
    )
    print_table(rows, TABLE)
    for kind, code in exits.items():
        print(f"{kind}: the server process died during the run (exit code {code})")
    if ratio is not None:
        print(
            f"\nsingle stream through our server: {ratio:.1%} of sparamx.generate's "
            f"decode rate (target >= 90%)"
        )
    if args.json:
        payload = {
            "bench": "serve",
            "artifact": args.artifact,
            "servers": args.servers,
            "start_errors": start_errors,
            "died_with_exit_code": exits,
            "threads": args.threads,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "slots": args.slots,
            "llama_no_repack": args.llama_no_repack,
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
    ours = [r for r in rows if r["server"].startswith("sparamx")]
    return 0 if all(r["failed"] == 0 for r in ours) and not start_errors.get("sparamx") else 1


if __name__ == "__main__":
    sys.exit(main())
