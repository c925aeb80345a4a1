"""An OpenAI-compatible HTTP server for one packed artifact (FastAPI + uvicorn).

    python -m sparamx.serve ARTIFACT --host 127.0.0.1 --port 8000   (or: sparamx serve)

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``"stream": true`` as server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Requests are decoded by
``sparamx.serve.engine.Engine``: one worker thread, up to ``--slots`` requests together
(continuous batching), a bounded queue of waiting ones (a full queue answers 429). A
client that disconnects cancels its request, queued or running.

Every malformed request gets a 4xx with OpenAI's error body (``{"error": {"message",
"type", "param", "code"}}``): unreadable JSON or a wrong field 400, an unknown model
404, ``max_tokens`` out of range or a prompt that does not fit the context 400,
``n > 1`` and other unsupported options 400.

Sampling: ``temperature`` 0 is greedy, > 0 samples; without ``temperature`` the
model's ``generation_config`` decides (greedy unless it sets ``do_sample``), except
that ``top_p``/``top_k``/``min_p`` alone ask for sampling. ``top_k``, ``min_p``,
``repetition_penalty`` and ``ignore_eos`` are accepted as extra fields (the openai
client's ``extra_body``); names and defaults otherwise as in ``sparamx.generate``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, StreamingResponse
except ImportError as e:  # the server's packages are an extra
    raise ImportError(
        f"sparamx.serve needs FastAPI and uvicorn ({e}); install them with "
        "`pip install 'sparamx[serve]'`"
    ) from e

from .engine import DEFAULT_SLOTS, Engine, Job, QueueFull

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # KV cache length served (capped by the model's own context)
DEFAULT_MAX_TOKENS = 256  # new tokens when a request gives no max_tokens
MAX_STOP_STRINGS = 16
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks for its client


class ApiError(Exception):
    """A request we refuse: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        code = {404: "model_not_found", 429: "server_busy"}.get(self.status)
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": code}
        }


# -------------------------------------------------------------- request bodies


class _Request(BaseModel):
    """What both endpoints take. Unknown fields are ignored (clients send extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    # beyond OpenAI's fields (vLLM's names; the openai client sends them via extra_body)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False  # always max_tokens tokens (benchmarks)


class ChatRequest(_Request):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def _unsupported(req: _Request) -> None:
    """Options we cannot honour: a 400 that names them, never silently ignored."""
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported: one choice per request (n=1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(
                400, f"{name} is not supported (use repetition_penalty, an extra field)", name
            )
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported", "logprobs")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", "best_of")


def _sampling(req: _Request) -> dict:
    """The request's sampling fields as ``sparamx.generate`` options."""
    kw = {
        name: getattr(req, name)
        for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed")
        if getattr(req, name) is not None
    }
    if req.temperature is not None:
        kw["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            kw["temperature"] = req.temperature
    elif any(n in kw for n in ("top_p", "top_k", "min_p")):
        kw["do_sample"] = True
    if req.stop is not None:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(s == "" for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop")
        kw["stop"] = stop
    return kw


# --------------------------------------------------------------------- the app


class Server:
    """The request handling around an ``Engine``: validation, prompts, responses."""

    def __init__(self, engine: Engine, model_name: str, default_max_tokens: int):
        self.engine, self.model_name = engine, model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    # ------------------------------------------------------------ checks

    def parse(self, raw: bytes, kind: type[_Request]) -> _Request:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"invalid field {where}: {first['msg']}", where) from None
        if req.model != self.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves "
                f"{self.model_name!r} (GET /v1/models)",
                "model",
            )
        _unsupported(req)
        return req

    def prompt_ids(self, req: _Request) -> list[int]:
        from ..conversation import chat_prompt_ids

        tok = self.engine.tokenizer
        if isinstance(req, ChatRequest):
            try:
                ids = chat_prompt_ids(tok, req.messages)
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None
        elif isinstance(req.prompt, str) or (
            isinstance(req.prompt, list) and len(req.prompt) == 1 and isinstance(req.prompt[0], str)
        ):
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            ids = tok(text)["input_ids"]
        elif req.prompt and all(isinstance(i, int) for i in req.prompt):
            ids = list(req.prompt)
            vocab = len(tok)
            if any(not 0 <= i < vocab for i in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        else:
            raise ApiError(400, "prompt must be one string or one list of token ids", "prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty (0 tokens)", "prompt")
        return ids

    def max_new_tokens(self, req: _Request, prompt_len: int) -> int:
        context = self.engine.context
        if prompt_len >= context:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens; this server's context is {context} "
                f"tokens, and at least one must be left for the reply",
                "messages" if isinstance(req, ChatRequest) else "prompt",
            )
        room = context - prompt_len
        name, asked = "max_tokens", req.max_tokens
        if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
            name, asked = "max_completion_tokens", req.max_completion_tokens
        if asked is None:
            return min(self.default_max_tokens, room)
        if asked < 1:
            raise ApiError(400, f"{name} must be >= 1, got {asked}", name)
        if asked > room:
            raise ApiError(
                400,
                f"{name}={asked} does not fit: the prompt is {prompt_len} tokens and this "
                f"server's context is {context}, so at most {room} new tokens",
                name,
            )
        return asked

    def sampling(self, req: _Request) -> dict:
        from ..sampling import SamplingParams

        kw = _sampling(req)
        try:
            SamplingParams.resolve(self.engine.model.generation_config, **kw)
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        return kw

    # ---------------------------------------------------------- requests

    async def complete(self, request: Request, kind: type[_Request]):
        """The whole of one completion request: a JSON response or an SSE stream."""
        req = self.parse(await request.body(), kind)
        ids = self.prompt_ids(req)
        job_events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(event: str, data) -> None:  # on the decode thread
            loop.call_soon_threadsafe(job_events.put_nowait, (event, data))

        n_new = self.max_new_tokens(req, len(ids))
        job = Job(ids, n_new, on_event, self.sampling(req), stop_at_eos=not req.ignore_eos)
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="server_busy") from None
        meta = _Meta(req, self.model_name, len(ids), isinstance(req, ChatRequest))
        if req.stream:
            return StreamingResponse(
                self._sse(job, job_events, meta),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await self._whole(request, job, job_events, meta))

    async def _whole(self, request, job: Job, events: asyncio.Queue, meta: _Meta) -> dict:
        pieces: list[str] = []
        while True:
            try:
                event, data = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise ApiError(499, "client disconnected") from None
                continue
            if event == "text":
                pieces.append(data)
            elif event == "done":
                return meta.whole("".join(pieces), data)
            else:
                raise _job_failure(event, data)

    async def _sse(self, job: Job, events: asyncio.Queue, meta: _Meta) -> AsyncIterator[str]:
        """Server-sent events; leaving early (client gone) cancels the job."""
        try:
            yield _sse(meta.chunk("", first=True))
            while True:
                event, data = await events.get()
                if event == "text":
                    yield _sse(meta.chunk(data))
                elif event == "done":
                    yield _sse(meta.chunk(None, finish=_finish_reason(data)))
                    if meta.include_usage:
                        yield _sse(meta.usage_chunk(data))
                    break
                else:
                    err = _job_failure(event, data)
                    yield _sse(err.body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # no-op once done; stops a job whose client went away

    # ------------------------------------------------------------- other

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "sparamx",
        }

    def health(self) -> tuple[int, dict]:
        s = self.engine.stats
        body = {
            "status": "ok" if self.engine.ready.is_set() else "loading",
            "model": self.model_name,
            "context": self.engine.context,
            "waiting": self.engine.waiting,
            "running": s.running,
            "slots": self.engine.slots,
            "max_queue": self.engine.max_queue,
            "served": s.served,
            "cancelled": s.cancelled,
            "failed": s.failed,
        }
        return (200 if self.engine.ready.is_set() else 503), body


def _job_failure(event: str, data) -> ApiError:
    if event == "cancelled":
        return ApiError(503, "the request was cancelled (the server is stopping)")
    return ApiError(500, f"generation failed: {type(data).__name__}: {data}")


def _finish_reason(gen) -> str:
    return "length" if gen.stop_reason == "length" else "stop"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Meta:
    """The parts every response and chunk of one request share."""

    def __init__(self, req: _Request, model: str, prompt_tokens: int, chat: bool):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, gen) -> dict:
        n = len(gen.ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }

    def whole(self, text: str, gen) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish_reason(gen),
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(gen)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(gen)}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(gen)}

    def chunk(self, text: str | None, first: bool = False, finish: str | None = None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, gen) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(gen)}


def create_app(server: Server):
    """The FastAPI application for ``server``."""
    app = FastAPI(title="sparamx", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()}").body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}").body(), 500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.complete(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(request, CompletionRequest)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise ApiError(404, f"model {model_id!r} is not served here", "model")
        return server.model_card()

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    return app


# ---------------------------------------------------------------- running


def model_name_for(artifact: Path) -> str:
    """A name for the artifact: its directory, or the run's for ``RUN/pack/artifact``."""
    artifact = artifact.resolve()
    if artifact.name == "artifact" and artifact.parent.name == "pack":
        return artifact.parent.parent.name
    return artifact.name


def serving_context(model, asked: int | None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    context = asked or DEFAULT_CONTEXT
    return min(context, limit) if limit else context


class ServerThread:
    """uvicorn serving ``app`` on a background thread (``main``, tests, benchmarks): a
    context manager that returns once the socket listens and stops the server on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                cfg = self.server.config
                raise RuntimeError(
                    f"the HTTP server did not start on {cfg.host}:{cfg.port} (port in use?)"
                )
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sparamx.serve",
        description="Serve a packed artifact over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health).",
    )
    ap.add_argument("artifact", help="packed artifact directory (a run's pack/artifact)")
    ap.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="default 8000")
    ap.add_argument(
        "--model-name",
        default=None,
        help="the model id clients ask for (default: the run's or the artifact directory's name)",
    )
    ap.add_argument(
        "--context",
        type=int,
        default=None,
        help=f"KV cache length in tokens, prompt + reply (default {DEFAULT_CONTEXT}, "
        "capped by the model's)",
    )
    ap.add_argument(
        "--slots",
        type=int,
        default=DEFAULT_SLOTS,
        help=f"requests decoded together (default {DEFAULT_SLOTS}; 1: one at a time, "
        "through sparamx.generate, with the artifact's sparse KV cache if it records one)",
    )
    ap.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests waiting beyond the running ones; more get 429 (default 16)",
    )
    ap.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"new tokens when a request sets none (default {DEFAULT_MAX_TOKENS})",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--attention", choices=("exact", "fast"), default="exact")
    ap.add_argument("--no-compile", action="store_true", help="eager decode step (no warm-up)")
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, value in (
        ("--context", args.context),
        ("--max-queue", args.max_queue),
        ("--slots", args.slots),
        ("--default-max-tokens", args.default_max_tokens),
    ):
        if value is not None and value < 1:
            print(f"sparamx serve: error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    path = Path(args.artifact)
    from ..cli import _check_artifact_dir

    if why := _check_artifact_dir(path):
        print(f"sparamx serve: error: {why}", file=sys.stderr)
        return 2
    import torch

    from ..artifact import ArtifactError, load

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load(path)
    except ArtifactError as e:
        print(f"sparamx serve: error: {e}", file=sys.stderr)
        return 2
    engine = Engine(
        model,
        tokenizer,
        context=serving_context(model, args.context),
        max_queue=args.max_queue,
        compile=not args.no_compile,
        attention=args.attention,
        slots=args.slots,
    )
    server = Server(engine, args.model_name or model_name_for(path), args.default_max_tokens)
    # The decode loop runs on this (the main) thread and uvicorn on another: see
    # Engine.run (torch's OpenMP threads are slow from a second thread). SIGTERM stops
    # it as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ServerThread(create_app(server), args.host, args.port) as st:
            log.info(
                "serving %s as %r on http://%s:%d", path, server.model_name, args.host, st.port
            )
            engine.run(warm_up=not args.no_compile)
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
    except RuntimeError as e:  # the HTTP server did not start (e.g. the port is taken)
        print(f"sparamx serve: error: {e}", file=sys.stderr)
        return 1
    return 0
