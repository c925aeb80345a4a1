"""One model, one decode thread, a bounded queue in front: what ``sparamx.serve`` runs.

torch does not support two forward passes on one model at once from several threads, so
every request goes through a single worker thread, in arrival order. With ``slots`` > 1
(the default, ``DEFAULT_SLOTS``) it decodes up to that many requests together
(``sparamx.batch.BatchDecoder``, continuous batching: a waiting request joins between
two steps as soon as a slot is free; its prefill runs alone, the others wait for it).
With ``slots=1`` requests run one at a time through ``sparamx.generate``, which also
serves the sparse KV cache that an artifact may record (the batch decoder's cache is
dense). ``Engine.submit`` never blocks: when ``max_queue`` requests already wait it
raises ``QueueFull`` (the server answers 429). Each ``Job`` reports back through its
``on_event`` callback, called on the worker thread: ``("text", piece)`` as text is
decoded, then exactly one of ``("done", Generation)``, ``("error", exception)`` or
``("cancelled", None)``. Setting ``job.cancelled`` stops a job before it starts or after
its current token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 8  # requests decoded together (the batch decoder's rows)


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


def _batch_decoder(model, tokenizer, slots: int, context: int, compile):
    """The ``BatchDecoder`` for ``slots`` > 1, or None (a logged fallback to one request
    at a time) for a model it does not serve."""
    from ..batch import BatchDecoder

    try:
        dec = BatchDecoder(model, tokenizer, slots=slots, max_len=context, compile=compile)
    except ValueError as e:
        log.warning("%s: serving one request at a time", e)
        return None
    if getattr(model, "_sparamx_kv", None) is not None:
        log.info(
            "batched decode (%d slots) runs a dense KV cache; the model's sparse KV cache "
            "settings apply with --slots 1",
            slots,
        )
    return dec


class Engine:
    """The decode worker for one loaded model. ``context``: the KV cache length every
    request decodes with (one cache, compiled once; prompt + new tokens must fit);
    ``slots``: requests decoded together (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        context: int,
        max_queue: int = 16,
        compile: bool | str = True,
        attention: str = "exact",
        slots: int = DEFAULT_SLOTS,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots, self.batch = slots, None
        if slots > 1:
            self.batch = _batch_decoder(model, tokenizer, slots, context, compile)
            self.slots = 1 if self.batch is None else slots
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
        """Start the worker on a thread of its own; with ``warm_up`` it first compiles
        the decode steps for the context (``ready`` is set after). See ``run`` for
        why a server runs it on its main thread instead."""
        self._warm = warm_up
        self._thread.start()
        return self

    def run(self, warm_up: bool = True) -> None:
        """The worker on the calling thread, until ``stop``. ``python -m sparamx.serve``
        runs it on the main thread (uvicorn on another): with OpenMP (torch's CPU
        threads), a thread other than the one that first ran parallel work gets a
        thread team of its own beside the first one's, and with 2 threads on 2 cores
        each parallel op then took 1.6-1.9x as long (SmolLM2 decode from a worker
        thread: 39 tok/s against 79 from the main thread, 2-core AMX Xeon)."""
        self._warm = warm_up
        self._run()

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
        if self._thread.is_alive():
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
        if self.batch is not None:
            self._run_batched()
            return
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                self._finish(job, "cancelled", None)
                continue
            self.stats.running = 1
            try:
                self._generate(job)
            finally:
                self.stats.running = 0

    def _run_batched(self) -> None:
        """Continuous batching: admit waiting jobs into free slots, then one step for
        all active ones; block on the queue only when nothing is active."""
        dec, stopping = self.batch, False
        while not stopping or dec.active:
            while dec.free and not stopping:
                try:
                    job = self._queue.get(block=dec.active == 0)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True  # stop(): the active jobs finish first
                else:
                    self._admit(job)
            self.stats.running = dec.active
            if dec.active:
                self._step()
                self.stats.running = dec.active

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, "cancelled", None)
            return
        try:
            seq = self.batch.add(
                job.prompt_ids,
                job.max_new_tokens,
                stream=lambda text: self._emit(job, "text", text),
                stop_at_eos=job.stop_at_eos,
                tag=job,
                **job.sampling,
            )
        except Exception as e:  # noqa: BLE001  (reported to the request; the worker lives on)
            log.exception("prefill failed")
            self._finish(job, "error", e)
            return
        if seq.result is not None:  # its first token ended it
            self._done(job, seq.result)

    def _step(self) -> None:
        dec = self.batch
        try:
            done = dec.step(should_stop=lambda seq: seq.tag.cancelled.is_set())
        except Exception as e:  # noqa: BLE001  (fails the batch's jobs, not the server)
            log.exception("batched decode step failed")
            for seq in list(dec.rows):
                dec.cancel(seq)
                self._finish(seq.tag, "error", e)
            return
        for seq in done:
            self._done(seq.tag, seq.result)

    def _warm_up(self) -> None:
        """Compile the decode steps at the serving cache length, so that the first
        request does not wait for a compile: batched, a step at batch size 1 and one at
        2 (the graph for every larger batch); one at a time, one short generation per
        decode step (greedy, sampling)."""
        t0 = time.perf_counter()
        if self.batch is not None:
            try:
                self._warm_up_batch()
            except Exception:  # noqa: BLE001  (a warm-up failure must not kill the server)
                log.exception("warm-up failed; requests will compile on first use")
            self.warm_up_s = time.perf_counter() - t0
            log.info("batched decode steps ready in %.1f s", self.warm_up_s)
            return
        for sampling in ({"do_sample": False}, {"do_sample": True, "seed": 0}):
            try:
                self._decode([0], 2, sampling, None, None, True)
            except Exception:  # noqa: BLE001  (a warm-up failure must not kill the server)
                log.exception("warm-up generation failed; requests will compile on first use")
        self.warm_up_s = time.perf_counter() - t0
        log.info("decode steps ready in %.1f s", self.warm_up_s)

    def _warm_up_batch(self) -> None:
        dec = self.batch
        dec.add([0], 3, stop_at_eos=False)
        dec.step()  # batch size 1
        dec.add([0], 3, stop_at_eos=False)
        dec.run()  # batch size 2, then 1 again

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
        self._done(job, out)

    def _done(self, job: Job, out) -> None:
        """A finished generation: ``("done", out)``, or ``("cancelled", None)``."""
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
