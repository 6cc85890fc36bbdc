"""The engine thread: one thread owns the `Engine` and runs its steps, the HTTP handlers talk
to it through a queue of commands, and tokens come back to each request's asyncio queue.

    handler --submit/cancel--> inbox (thread-safe) --> engine thread: engine.submit / cancel
                                                       engine.step() while anything runs
    handler <--(index, new ids, done)-- one loop.call_soon_threadsafe <-- after every step

The engine is not thread-safe, so only this thread touches it; no handler ever blocks the
event loop on model work. A step's new ids for every request cross to the event loop in one
call (one wake-up of the loop per step, not one per request), each into the asyncio queue
its request reads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PLDRError

log = logging.getLogger("pldr")


class QueueFull(Exception):
    """More requests wait for a slot than the server accepts (`--max-queue`)."""


@dataclass
class Job:
    """One completion choice on its way through the engine."""

    prompt: list[int]
    max_new_tokens: int
    sampling: dict[str, Any]           # temperature, top_k, top_p, seed, eos_id
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue                # (index, new ids, done); shared by a request's jobs
    index: int = 0                     # which choice of its request this job is
    request: Any = None                # the engine's request, set by the engine thread
    sent: int = 0                      # ids already delivered
    cancelled: bool = False
    error: Exception | None = None     # the engine refused the request, or it failed
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def deliver(self, ids: list[int], done: bool) -> None:
        """Hand `ids` to the request from any thread."""
        self.loop.call_soon_threadsafe(self.sink.put_nowait, (self.index, ids, done))


def _hand_over(batch: list[tuple[Job, list[int], bool]]) -> None:
    """On the event loop: put one step's ids into their requests' queues."""
    for job, ids, done in batch:
        job.sink.put_nowait((job.index, ids, done))


class EngineRunner:
    """Runs `engine` in a daemon thread; `submit` and `cancel` may be called from any thread.

    `on_finish(job)` (optional) is called on the engine thread when a job ends, for metrics."""

    def __init__(self, engine: Any, max_queue: int = 256,
                 on_finish: Callable[[Job], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_finish = on_finish
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: list[Job] = []
        self._pending = 0                 # submitted, not yet picked up by the engine thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pldr-engine", daemon=True)
        self.error: BaseException | None = None

    # ----- called from the event loop ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests that have no slot yet (queued in the engine or on their way to it)."""
        with self._lock:
            queued = sum(1 for j in self._live if j.first_token_at is None)
            return self._pending + queued

    @property
    def running(self) -> int:
        """Requests in a slot, producing tokens."""
        with self._lock:
            return sum(1 for j in self._live if j.first_token_at is not None)

    def submit(self, job: Job) -> Job:
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        with self._lock:
            if self.waiting_unlocked() >= self.max_queue:
                raise QueueFull()
            self._pending += 1
        self._inbox.put(("submit", job))
        return job

    def waiting_unlocked(self) -> int:
        return self._pending + sum(1 for j in self._live if j.first_token_at is None)

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    # ----- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self._live)
                if self._live:
                    self.engine.step()
                    self._publish()
        except BaseException as e:  # noqa: BLE001  the handlers must hear of it, not hang
            log.exception("engine thread failed")
            self.error = e
            for job in list(self._live):
                job.deliver([], True)

    def _drain(self, block: bool) -> None:
        """Apply every waiting command; wait for one when nothing runs."""
        while True:
            try:
                item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            kind, job = item
            if kind == "submit":
                with self._lock:
                    self._pending -= 1
                if job.cancelled:
                    continue
                try:
                    job.request = self.engine.submit(job.prompt, job.max_new_tokens,
                                                     **job.sampling)
                except PLDRError as e:  # the request's fault: tell its handler, run on
                    job.error = e
                    job.deliver([], True)
                    continue
                with self._lock:
                    self._live.append(job)
            elif job.request is not None and job in self._live:
                self.engine.cancel(job.request)
                self._finish(job)
            else:
                job.cancelled = True  # still in the inbox: never submitted

    def _publish(self) -> None:
        """Hand every job the ids the last step made, all of them in one call per event
        loop; retire the finished ones."""
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[int], bool]]] = {}
        for job in list(self._live):
            tokens = job.request.tokens
            new = tokens[job.sent:]
            if new:
                job.first_token_at = job.first_token_at or now
                job.last_token_at = now
                job.sent = len(tokens)
            done = job.request.done
            if done:
                job.error = job.error or job.request.error  # the model failed on it
            if new or done:
                batches.setdefault(job.loop, []).append((job, new, done))
            if done:
                self._finish(job)
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_hand_over, batch)

    def _finish(self, job: Job) -> None:
        with self._lock:
            self._live.remove(job)
        if self.on_finish is not None:
            self.on_finish(job)
