"""One model, one decode thread, a bounded queue in front: what ``sparamx.serve`` runs.

torch does not support two forward passes on one model at once from several threads
(and the lean decode loop keeps one KV cache per model), so every request goes through
a single worker thread, one at a time, in arrival order. ``Engine.submit`` never blocks:
when ``max_queue`` requests already wait it raises ``QueueFull`` (the server answers
429). Each ``Job`` reports back through its ``on_event`` callback, called on the worker
thread: ``("text", piece)`` as text is decoded, then exactly one of ``("done",
Generation)``, ``("error", exception)`` or ``("cancelled", None)``. Setting
``job.cancelled`` stops a job before it starts or after its current token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Raised by ``Engine.submit`` when ``max_queue`` jobs are already waiting."""


@dataclass
class Job:
    """One generation request: token ids in, events out (see the module docstring)."""

    prompt_ids: list[int]
    max_new_tokens: int
    on_event: Callable[[str, object], None]
    sampling: dict = field(default_factory=dict)  # sparamx.generate's sampling options
    stop_at_eos: bool = True  # False: always max_new_tokens tokens (benchmarks)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class EngineStats:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    running: int = 0


class Engine:
    """The decode worker for one loaded model. ``context``: the KV cache length every
    request decodes with (one cache, compiled once; prompt + new tokens must fit)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        context: int,
        max_queue: int = 16,
        compile: bool | str = True,
        attention: str = "exact",
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.context, self.max_queue = context, max_queue
        self.compile, self.attention = compile, attention
        self.stats = EngineStats()
        self.ready = threading.Event()
        self.warm_up_s = 0.0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="sparamx-decode", daemon=True)

    # ------------------------------------------------------------- control

    def start(self, warm_up: bool = True) -> Engine:
        """Start the worker; with ``warm_up`` it first compiles the greedy and the
        sampling decode steps for the context (``ready`` is set after)."""
        self._warm = warm_up
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current job finish (the waiting ones are cancelled), then end the
        worker."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish(job, "cancelled", None)
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"server busy: {self.max_queue} requests already waiting "
                f"(--max-queue {self.max_queue}); retry later"
            ) from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # -------------------------------------------------------------- worker

    def _run(self) -> None:
        if self._warm:
            self._warm_up()
        self.ready.set()
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                self._finish(job, "cancelled", None)
                continue
            self.stats.running = 1
            try:
                self._generate(job)
            finally:
                self.stats.running = 0

    def _warm_up(self) -> None:
        """One short generation per decode step (greedy, sampling) at the serving cache
        length, so the first request does not wait for a compile."""
        t0 = time.perf_counter()
        for sampling in ({"do_sample": False}, {"do_sample": True, "seed": 0}):
            try:
                self._decode([0], 2, sampling, None, None, True)
            except Exception:  # noqa: BLE001  (a warm-up failure must not kill the server)
                log.exception("warm-up generation failed; requests will compile on first use")
        self.warm_up_s = time.perf_counter() - t0
        log.info("decode steps ready in %.1f s", self.warm_up_s)

    def _decode(self, ids, max_new_tokens, sampling, stream, should_stop, stop_at_eos):
        from ..generate import generate

        return generate(
            self.model,
            self.tokenizer,
            ids,
            max_new_tokens,
            stream=stream,
            compile=self.compile,
            attention=self.attention,
            max_cache_len=self.context,
            should_stop=should_stop,
            stop_at_eos=stop_at_eos,
            **sampling,
        )

    def _generate(self, job: Job) -> None:
        def piece(text: str) -> None:
            self._emit(job, "text", text)

        try:
            out = self._decode(
                job.prompt_ids,
                job.max_new_tokens,
                job.sampling,
                piece,
                job.cancelled.is_set,
                job.stop_at_eos,
            )
        except Exception as e:  # noqa: BLE001  (reported to the request; the worker lives on)
            log.exception("generation failed")
            self._finish(job, "error", e)
            return
        if out.stop_reason == "cancelled":
            self._finish(job, "cancelled", None)
        else:
            self._finish(job, "done", out)

    def _finish(self, job: Job, kind: str, data) -> None:
        counter = {"done": "served", "cancelled": "cancelled", "error": "failed"}[kind]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._emit(job, kind, data)

    @staticmethod
    def _emit(job: Job, kind: str, data) -> None:
        try:
            job.on_event(kind, data)
        except Exception:  # noqa: BLE001  (the receiver is gone, e.g. its event loop closed)
            job.cancelled.set()
