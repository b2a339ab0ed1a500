"""Dynamic batching: concurrent requests gathered into one model call, on one worker thread.

Requests are queued as jobs with a *key*: jobs with the same key can share a model call (the
same answer length and sampling for chat; the same guidance and sampling for images, whose
rows each carry their own seed). The worker takes the oldest job, waits up to ``max_wait_ms``
from that job's arrival for more jobs with its key (up to ``max_batch`` rows), and runs them
together: chat through :meth:`Pipeline.answer_batch`, images through :meth:`Pipeline.generate`
with one seed per image, so an image is the same whatever else was in its batch. Jobs with
other keys wait for the next round, in arrival order.

The queue is bounded (``max_queue`` waiting jobs): a full queue refuses a job at once with
:class:`QueueFull` (the app answers 429 with ``Retry-After``). :meth:`Batcher.close` stops new
jobs and lets the worker finish every job already queued or running.

One thread runs the model, so the model never sees two calls at once, and the event loop that
serves HTTP never waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field
from typing import Any

from mllm.inference import Pipeline
from mllm.serving.protocol import ChatJob, ImageJob

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs; retry later."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new jobs."""


@dataclass(frozen=True)
class BatchingConfig:
    """``max_batch``: rows per model call (answers, or images); 1 = no batching.
    ``max_wait_ms``: how long the oldest job waits for batch mates. ``max_queue``: waiting jobs
    before 429. ``timeout_s``: how long a request waits for its answer before 504."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}; expected an integer >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms={self.max_wait_ms}; expected a number >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout={self.timeout_s}; expected a number > 0")


@dataclass
class _Pending:
    job: ChatJob | ImageJob
    key: Hashable
    rows: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)
    on_text: Callable[[str], None] | None = None  # a streamed answer's pieces, as they are drawn


@dataclass
class BatchStats:
    """What the worker has done: model calls, jobs, and the largest call in jobs."""

    calls: int = 0
    jobs: int = 0
    largest: int = 0


def job_key(job: ChatJob | ImageJob) -> Hashable:
    """Jobs with equal keys may share a model call."""
    if isinstance(job, ImageJob):
        return ("image", astuple(job.sampling))
    # Greedy answers do not depend on the seed; a sampled answer with a chosen seed must not
    # depend on its batch mates (they share one generator), so it runs alone.
    alone = object() if job.seeded and job.sampling.temperature > 0 else None
    return ("chat", job.max_tokens, astuple(job.sampling), alone)


class Batcher:
    """The one worker thread that runs a :class:`Pipeline` on batches of queued jobs."""

    def __init__(self, pipe: Pipeline, config: BatchingConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self._pending: deque[_Pending] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="dualtoken-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, job: ChatJob | ImageJob, on_text: Callable[[str], None] | None = None) -> Future:
        """Queue ``job``; its future gets the answer (str) or the images (list of (H, W, 3) uint8).

        ``on_text`` (chat only): called on the worker thread with each piece of the answer as it
        is drawn, before the future is done; the pieces put together are the answer."""
        rows = job.n if isinstance(job, ImageJob) else 1
        pending = _Pending(job, job_key(job), rows, Future(), on_text=on_text)
        with self._condition:
            if self._closing:
                raise BatcherClosed
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull
            self._pending.append(pending)
            self._condition.notify()
        return pending.future

    def run(self, job: ChatJob | ImageJob, timeout: float | None = None) -> Any:
        """Submit ``job`` and wait for its result (for callers on ordinary threads, like the web page)."""
        return self.submit(job).result(timeout=self.config.timeout_s if timeout is None else timeout)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; finish the queued and running ones, then stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._worker.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _take_batch(self) -> list[_Pending] | None:
        with self._condition:
            while not self._pending:
                if self._closing:
                    return None
                self._condition.wait()
            first = self._pending[0]
            deadline = first.arrived + self.config.max_wait_ms / 1000
            while not self._closing and self._rows(first.key) < self.config.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            batch, rows, kept = [], 0, deque()
            while self._pending:
                pending = self._pending.popleft()
                fits = not batch or rows + pending.rows <= self.config.max_batch
                if pending.key == first.key and fits:
                    batch.append(pending)
                    rows += pending.rows
                else:
                    kept.append(pending)
            self._pending = kept
            return batch

    def _rows(self, key: Hashable) -> int:
        return sum(pending.rows for pending in self._pending if pending.key == key)

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
            if live:
                self._serve(live)

    def _serve(self, batch: list[_Pending]) -> None:
        self.stats.calls += 1
        self.stats.jobs += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            results = self._call(batch)
        except ValueError:
            if len(batch) == 1:
                return self._fail(batch[0], self._call)
            # One bad job (a prompt too long for the context ...) must not fail its batch mates.
            for pending in batch:
                self._fail(pending, self._call)
            return None
        except Exception as error:  # the model failed (out of memory ...): every job in the call hears of it
            logger.exception("model call failed")
            for pending in batch:
                pending.future.set_exception(error)
            return None
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
        return None

    def _fail(self, pending: _Pending, call: Callable[[list[_Pending]], list[Any]]) -> None:
        try:
            pending.future.set_result(call([pending])[0])
        except Exception as error:
            if not isinstance(error, ValueError):
                logger.exception("model call failed")
            pending.future.set_exception(error)

    def _call(self, batch: list[_Pending]) -> list[Any]:
        first = batch[0].job
        if isinstance(first, ImageJob):
            prompts = [pending.job.prompt for pending in batch for _ in range(pending.job.n)]
            seeds = [pending.job.seed + k for pending in batch for k in range(pending.job.n)]
            sampling = first.sampling
            images = self.pipe.generate(
                prompts,
                seeds=seeds,
                cfg=sampling.cfg,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                temperature=sampling.temperature,
            )
            results, start = [], 0
            for pending in batch:
                results.append(images[start : start + pending.job.n])
                start += pending.job.n
            return results
        jobs: list[ChatJob] = [pending.job for pending in batch]
        listeners = [pending.on_text for pending in batch]

        def on_text(row: int, piece: str) -> None:
            if listeners[row] is not None:
                listeners[row](piece)

        return self.pipe.answer_batch(
            [job.image for job in jobs],
            [job.question for job in jobs],
            [job.history for job in jobs],
            max_new_tokens=first.max_tokens,
            sampling=first.sampling,
            seed=first.seed,
            on_text=on_text if any(listeners) else None,
        )
