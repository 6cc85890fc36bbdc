"""The engine process: one process owns the model and its `Engine` and runs its steps; the
HTTP server's process talks to it through two pipes, and tokens come back to each request's
asyncio queue.

    handler --submit/cancel--> runner --commands pipe--> engine process: engine.submit/cancel
                                                         engine.step() while anything runs
    handler <--(index, ids, logprobs, done)-- reader thread <--results pipe-- a message a step

Why a process and not a thread: a thread shares the interpreter lock with the event loop, so
the server ran on one core whatever the machine had (server CPU time equalled wall time):
every socket write of a token waited for the model's Python code, and a small model's step
waited for the event loop. In its own process the model has a core to itself (as vLLM's
engine core does) and the event loop the others.

The engine process builds its engine from an `EngineSpec` (the command line's model flags),
answers `ready` with the model's config or `failed` with a one-line reason, then steps while
any request runs and blocks on the commands pipe when none does. It ignores SIGINT and
SIGTERM (the server drains running requests first, then stops it) and exits when the server
does: a closed pipe ends it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from ..errors import PLDRError

log = logging.getLogger("pldr")

START_TIMEOUT_S = 600.0  # loading and (with --compile) compiling a large model takes a while


class QueueFull(Exception):
    """More requests wait for a slot than the server accepts (`--max-queue`)."""


class EngineStopped(Exception):
    """The engine process has ended; nothing more can be generated."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds its engine from (picklable: the CLI's model flags)."""

    model: str
    config: str | None = None
    G_LM: str | None = None          # a predefined G_LM file for every request
    device: str | None = None
    dtype: str = "float32"
    max_batch: int = 16
    max_len: int | None = None       # positions per slot (None: the model's max_seq_len)
    compile: bool = False
    threads: int = 1                 # torch threads of the engine process


@dataclass
class Job:
    """One completion choice on its way through the engine."""

    prompt: list[int]
    max_new_tokens: int
    options: dict[str, Any]            # Engine.submit's keywords: sampling, seed, logprobs
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue                # (index, new ids, their logprobs, done); per request
    index: int = 0                     # which choice of its request this job is
    id: int = -1                       # the runner's id for it, set by `submit`
    sent: int = 0                      # ids delivered so far
    done: bool = False                 # ended: its last ids are delivered (or never submitted)
    error: Exception | None = None     # why it failed (see `failure`)
    failure: str | None = None         # "refused" (the request), "model" (NaN logits), "engine"
    prompt_logprobs: list | None = None  # TokenLogprobs per prompt id ([0] None), if asked

    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def deliver(self, ids: list[int], done: bool) -> None:
        """Hand `ids` (without logprobs) to the request from any thread."""
        self.done = self.done or done
        self.loop.call_soon_threadsafe(self.sink.put_nowait, (self.index, ids, None, done))


def _hand_over(batch: list[tuple[Job, list[int], list | None, bool]]) -> None:
    """On the event loop: put one step's ids into their requests' queues."""
    for job, ids, logprobs, done in batch:
        job.sink.put_nowait((job.index, ids, logprobs, done))


class EngineRunner:
    """The engine process seen from the server; `submit` and `cancel` may be called from any
    thread. `start` launches the process and waits until the model is loaded (a load that
    fails raises its PLDRError here, before the server binds); then `config` (the model's
    PLDRConfig), `max_len` and `dtype` are known.

    `on_finish(job)` (optional) is called when a job ends, for metrics."""

    def __init__(self, spec: EngineSpec, max_queue: int = 256,
                 on_finish: Callable[[Job], None] | None = None):
        self.spec, self.max_queue, self.on_finish = spec, max_queue, on_finish
        self.config: Any = None
        self.max_len = 0
        self.dtype = ""                   # what the model runs in (float32, bfloat16, int8)
        self.error: str | None = None     # why the engine process stopped, once it has
        self._live: dict[int, Job] = {}   # submitted, not ended
        self._ids = itertools.count()
        self._lock = threading.Lock()     # guards _live
        self._send_lock = threading.Lock()  # one message at a time down the commands pipe
        self._process: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None
        self._results: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False

    # ----- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Launch the engine process and wait for its model."""
        from ..config import PLDRConfig

        ctx = multiprocessing.get_context("spawn")  # fork is unsafe after torch's threads
        commands_out, commands_in = ctx.Pipe(duplex=False)
        results_out, results_in = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=engine_main, name="pldr-engine", daemon=True,
                                    args=(self.spec, commands_out, results_in))
        self._process.start()
        commands_out.close()
        results_in.close()
        self._commands, self._results = commands_in, results_out
        try:
            if not results_out.poll(START_TIMEOUT_S):
                raise PLDRError(f"the engine process did not load the model within "
                                f"{START_TIMEOUT_S:.0f} s")
            kind, *rest = results_out.recv()
        except EOFError:
            self.stop(timeout=0)
            raise PLDRError("the engine process exited while loading the model; see the log "
                            "above") from None
        except BaseException:  # the timeout, or Ctrl-C: do not wait out the load
            self.stop(timeout=0)
            raise
        if kind == "failed":
            self.stop()
            raise PLDRError(rest[0])
        config, self.max_len, self.dtype = rest
        self.config = PLDRConfig.from_dict(config)
        self._reader = threading.Thread(target=self._read, name="pldr-engine-reader",
                                        daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (after the server has drained its requests): it ends
        after its current step; one that has not after `timeout` seconds is killed (it
        ignores SIGTERM)."""
        self._stopping = True
        if self._commands is not None:
            self._send(("stop",))
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(10)
        if self._reader is not None:
            self._reader.join(timeout)

    # ----- requests -----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests that have no slot yet (no token so far)."""
        with self._lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        return sum(1 for j in self._live.values() if j.first_token_at is None)

    @property
    def running(self) -> int:
        """Requests in a slot, producing tokens."""
        with self._lock:
            return sum(1 for j in self._live.values() if j.first_token_at is not None)

    def submit(self, job: Job) -> Job:
        with self._lock:  # checked under the lock `_fail_all` empties _live under
            if self.error is not None:
                raise EngineStopped(self.error)
            if self._waiting_locked() >= self.max_queue:
                raise QueueFull()
            job.id = next(self._ids)
            self._live[job.id] = job
        self._send(("submit", job.id, job.prompt, job.max_new_tokens, job.options))
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job` now (its slot is freed in the engine process's next step)."""
        with self._lock:
            live = self._live.pop(job.id, None) is not None
        if live:
            job.done = True
            self._send(("cancel", job.id))
            if self.on_finish is not None:
                self.on_finish(job)

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:  # not _lock: a full pipe must not stall the reader
                self._commands.send(message)
        except (OSError, ValueError):  # the process is gone; the reader reports why
            pass

    # ----- the reader thread --------------------------------------------------------------

    def _read(self) -> None:
        """Deliver every step's results, until the engine process ends."""
        while True:
            try:
                kind, *rest = self._results.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._fail_all("the engine process exited")
                return
            if kind == "step":
                self._publish(rest[0])
            elif kind == "crashed":
                log.error("engine process failed:\n%s", rest[1])
                self._fail_all(rest[0])
                return

    def _publish(self, updates: list[tuple]) -> None:
        """One step's (job id, new ids, their logprobs, prompt logprobs, done, error kind,
        message) for each job that got ids or ended, handed to each event loop in one call."""
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list[tuple]] = {}
        ended = []
        with self._lock:
            for job_id, new, logprobs, prompt_logprobs, done, failure, message in updates:
                job = self._live.get(job_id)
                if job is None:
                    continue  # cancelled meanwhile
                if prompt_logprobs is not None:  # with the first update, before its ids
                    job.prompt_logprobs = prompt_logprobs
                if new:
                    job.first_token_at = job.first_token_at or now
                    job.last_token_at = now
                    job.sent += len(new)
                if failure is not None:
                    job.error, job.failure = PLDRError(message), failure
                if done:
                    job.done = True
                    del self._live[job_id]
                    ended.append(job)
                batches.setdefault(job.loop, []).append((job, new, logprobs, done))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_hand_over, batch)
        if self.on_finish is not None:
            for job in ended:
                self.on_finish(job)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self.error = reason
            jobs, self._live = list(self._live.values()), {}
        for job in jobs:
            job.error, job.failure = EngineStopped(reason), "engine"
            job.deliver([], True)
            if self.on_finish is not None:
                self.on_finish(job)


# ----- the engine process ----------------------------------------------------------------------

def engine_main(spec: EngineSpec, commands: Connection, results: Connection) -> None:
    """The engine process: build the engine, then step it for the server until told to stop
    or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server drains first, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        engine, G_LM = _build(spec)
    except Exception as e:  # noqa: BLE001  a load that fails must reach the CLI as one line
        message = str(e) if isinstance(e, PLDRError) else (
            f"the model could not be loaded: {type(e).__name__}: {e}")
        try:
            results.send(("failed", message))
        except OSError:
            pass  # the server is gone already
        return
    try:
        dtype = spec.dtype if spec.dtype == "int8" else \
            str(engine.model.dtype).removeprefix("torch.")  # bfloat16 may have fallen back
        results.send(("ready", engine.model.config.to_dict(), engine.max_len, dtype))
        _serve(engine, G_LM, commands, results)
    except (EOFError, BrokenPipeError, OSError):
        return  # the server is gone
    except Exception as e:  # noqa: BLE001  the server must hear of it, not hang
        import traceback

        try:
            results.send(("crashed", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except OSError:
            pass


def _build(spec: EngineSpec):
    """(engine, G_LM) as `pldr serve`'s flags say."""
    import torch

    from ..checkpoint.load import load_for_decoding
    from ..inference import Engine

    torch.set_num_threads(spec.threads)
    model, G_LM = load_for_decoding(spec.model, spec.config, G_LM=spec.G_LM,
                                    device=spec.device, dtype=spec.dtype)
    return Engine(model, max_batch=spec.max_batch, max_len=spec.max_len,
                  compile=spec.compile), G_LM


def _serve(engine: Any, G_LM: Any, commands: Connection, results: Connection) -> None:
    """Apply commands, step while anything runs, send each step's news in one message."""
    running: dict[int, Any] = {}   # job id -> the engine's request
    sent: dict[int, int] = {}      # job id -> ids reported so far
    while True:
        block = not running
        while commands.poll(None if block else 0):
            block = False
            kind, *rest = commands.recv()
            if kind == "stop":
                return
            if kind == "submit":
                job_id, prompt, max_new_tokens, options = rest
                try:
                    running[job_id] = engine.submit(prompt, max_new_tokens, G_LM=G_LM,
                                                    **options)
                    sent[job_id] = 0
                except PLDRError as e:  # the request's fault: tell its handler, run on
                    results.send(("step", [(job_id, [], None, None, True, "refused", str(e))]))
            elif kind == "cancel" and rest[0] in running:
                engine.cancel(running.pop(rest[0]))
                del sent[rest[0]]
        if not running:
            continue
        engine.step()
        updates = []
        for job_id, req in list(running.items()):
            start = sent[job_id]
            new = req.tokens[start:]
            sent[job_id] = len(req.tokens)
            failure = None if req.error is None else "model"
            if new or req.done:
                logprobs = req.token_logprobs[start:] if req.logprobs is not None else None
                prompt = req.prompt_token_logprobs if start == 0 else None  # once, first
                updates.append((job_id, new, logprobs, prompt, req.done, failure,
                                None if failure is None else str(req.error)))
            if req.done:
                del running[job_id], sent[job_id]
        if updates:
            results.send(("step", updates))
