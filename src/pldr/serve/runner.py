"""The engine process: one process owns the model and its `Engine` and runs its steps; the
HTTP server's process talks to it through two pipes of typed messages (messages.py), and
each step's ids go to their `Choice`s on the event loop.

    handler --submit/cancel--> runner --Submit/Cancel--> engine process (EngineLoop):
                                                         engine.submit/cancel, then
                                                         engine.step() while anything runs
    Choice.accept <--event loop-- reader thread <--Step(Update per choice)-- after a step

Who owns what: on the server side a `Choice` owns its request's lifecycle (waiting,
running, finished or failed) and what was shown of it; in the engine process a `Reported`
owns what was sent of its engine request. The runner only routes ids to choices.

Why a process and not a thread: a thread shares the interpreter lock with the event loop, so
the server ran on one core whatever the machine had (server CPU time equalled wall time):
every socket write of a token waited for the model's Python code, and a small model's step
waited for the event loop. In its own process the model has a core to itself (as vLLM's
engine core does) and the event loop the others.

The engine process builds its engine from an `EngineSpec` (the command line's model flags),
answers `Ready` with the model's config or `LoadFailed` with a one-line reason, then steps while
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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from ..errors import PLDRError
from .choice import RUNNING, WAITING, Choice
from .messages import (Cancel, Crashed, Failure, LoadFailed, Ready, Sampling, Step, Stop,
                       Submit, Update)

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


class EngineRunner:
    """The engine process seen from the server. `start` launches the process and waits
    until the model is loaded (a load that fails raises its PLDRError here, before the
    server binds); then `config` (the model's PLDRConfig), `max_len` and `dtype` are known.

    `submit` and `cancel` run on the server's event loop, and so does everything that
    changes a choice: the reader thread only receives the engine process's messages and
    hands each to the loop. The runner owns no request state of its own: `_choices` routes
    an id to its `Choice` while the engine holds it, and a choice leaves it in the same
    call that finishes it.

    `on_finish(choice)` (optional) is called when a submitted choice ends, for metrics."""

    def __init__(self, spec: EngineSpec, max_queue: int = 256,
                 on_finish: Callable[[Choice], None] | None = None):
        self.spec, self.max_queue, self.on_finish = spec, max_queue, on_finish
        self.config: Any = None
        self.max_len = 0
        self.dtype = ""                    # what the model runs in (float32, bfloat16, int8)
        self.error: str | None = None      # why the engine process stopped, once it has
        self._choices: dict[int, Choice] = {}  # id -> choice, while the engine holds it
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, from `submit`
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
            answer = results_out.recv()
        except EOFError:
            self.stop(timeout=0)
            raise PLDRError("the engine process exited while loading the model; see the log "
                            "above") from None
        except BaseException:  # the timeout, or Ctrl-C: do not wait out the load
            self.stop(timeout=0)
            raise
        if isinstance(answer, LoadFailed):
            self.stop()
            raise answer.error()
        self.config, self.max_len = PLDRConfig.from_dict(answer.config), answer.max_len
        self.dtype = answer.dtype
        self._reader = threading.Thread(target=self._read, name="pldr-engine-reader",
                                        daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (after the server has drained its requests): it ends
        after its current step; one that has not after `timeout` seconds is killed (it
        ignores SIGTERM)."""
        self._stopping = True
        if self._commands is not None:
            self._send(Stop())
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(10)
        if self._reader is not None:
            self._reader.join(timeout)

    # ----- choices (on the event loop) ----------------------------------------------------

    @property
    def waiting(self) -> int:
        """Choices that have no slot yet (no id so far)."""
        return sum(1 for c in self._choices.values() if c.phase == WAITING)

    @property
    def running(self) -> int:
        """Choices in a slot, producing ids."""
        return sum(1 for c in self._choices.values() if c.phase == RUNNING)

    def submit(self, choice: Choice, prompt: list[int], max_new_tokens: int,
               sampling: Sampling) -> None:
        """Queue `choice` in the engine; raises EngineStopped or QueueFull (not queued)."""
        if self.error is not None:
            raise EngineStopped(self.error)
        if self.waiting >= self.max_queue:
            raise QueueFull()
        self._loop = self._loop or asyncio.get_running_loop()
        choice.id = next(self._ids)
        self._choices[choice.id] = choice
        self._send(Submit(choice.id, tuple(prompt), max_new_tokens, sampling))

    def cancel(self, choice: Choice) -> None:
        """Stop `choice` now (its slot is freed in the engine process's next step)."""
        if self._choices.pop(choice.id, None) is not None:
            self._send(Cancel(choice.id))
            self._ended(choice)
        choice.finish()

    def _ended(self, choice: Choice) -> None:
        if self.on_finish is not None:
            self.on_finish(choice)

    def _dispatch(self, step: Step) -> None:
        """On the event loop: hand one step's updates to their choices; a choice that a
        stop string ended while the engine still runs it is cancelled there."""
        for id, ids in step.ids:
            choice = self._choices.get(id)
            if choice is not None:
                choice.accept_ids(ids)
                self._accepted(choice, engine_done=False)
        for update in step.updates:
            choice = self._choices.get(update.id)
            if choice is None:
                continue  # cancelled meanwhile
            choice.accept(update)
            self._accepted(choice, update.done)

    def _accepted(self, choice: Choice, engine_done: bool) -> None:
        """After a choice took its ids: one that has finished leaves the routing table, and
        one a stop string ended while the engine runs it is cancelled there."""
        if choice.done:
            del self._choices[choice.id]
            if not engine_done:
                self._send(Cancel(choice.id))
            self._ended(choice)

    def _fail_all(self, reason: str) -> None:
        """On the event loop: the engine process ended; every choice it held fails."""
        choices, self._choices = list(self._choices.values()), {}
        for choice in choices:
            choice.fail(Failure("engine", reason))
            self._ended(choice)

    def _send(self, message: Any) -> None:
        try:
            with self._send_lock:
                self._commands.send(message)
        except (OSError, ValueError):  # the process is gone; the reader reports why
            pass

    # ----- the reader thread --------------------------------------------------------------

    def _read(self) -> None:
        """Hand every message of the engine process to the event loop, until it ends."""
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._engine_ended("the engine process exited")
                return
            if isinstance(message, Step):
                self._on_loop(self._dispatch, message)
            elif isinstance(message, Crashed):
                log.error("engine process failed:\n%s", message.traceback)
                self._engine_ended(message.reason)
                return

    def _engine_ended(self, reason: str) -> None:
        self.error = reason  # from now on `submit` refuses; then the held choices fail
        self._on_loop(self._fail_all, reason)

    def _on_loop(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return  # nothing was ever submitted: nothing to hand over
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: the server is gone
            pass


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
        failed = (LoadFailed(str(e), e.param) if isinstance(e, PLDRError) else
                  LoadFailed(f"the model could not be loaded: {type(e).__name__}: {e}"))
        try:
            results.send(failed)
        except OSError:
            pass  # the server is gone already
        return
    try:
        dtype = spec.dtype if spec.dtype == "int8" else \
            str(engine.model.dtype).removeprefix("torch.")  # bfloat16 may have fallen back
        results.send(Ready(engine.model.config.to_dict(), engine.max_len, dtype))
        EngineLoop(engine, G_LM, results).run(commands)
    except (EOFError, BrokenPipeError, OSError):
        return  # the server is gone
    except Exception as e:  # noqa: BLE001  the server must hear of it, not hang
        import traceback

        try:
            results.send(Crashed(f"{type(e).__name__}: {e}", traceback.format_exc()))
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


class Reported:
    """An engine request in the engine process and how much of it the server has been sent
    (the one count of that in this process)."""

    __slots__ = ("id", "request", "ids", "logprobs")

    def __init__(self, id: int, request: Any):
        self.id, self.request = id, request
        self.ids = 0  # new ids sent so far (their logprobs with them)

    def update(self) -> Update | tuple[int, tuple[int, ...]] | None:
        """What the server has not been sent yet: None if nothing changed, (id, new ids) if
        that is all, else an `Update`."""
        req, start = self.request, self.ids
        new = req.tokens[start:]
        plain = req.logprobs is None and (start or req.prompt_token_logprobs is None)
        if not req.done and (not new or plain):
            self.ids = len(req.tokens)
            return (self.id, tuple(new)) if new else None
        self.ids = len(req.tokens)
        failure = None if req.error is None else Failure("model", str(req.error))
        return Update(self.id, tuple(new),
                      None if req.logprobs is None else tuple(req.token_logprobs[start:]),
                      # the prompt's logprobs once, with the first update
                      None if start or req.prompt_token_logprobs is None
                      else tuple(req.prompt_token_logprobs),
                      req.done, failure)


class EngineLoop:
    """The engine process's loop: apply the server's commands, step while anything runs,
    send each step's news as one `Step`."""

    def __init__(self, engine: Any, G_LM: Any, results: Connection):
        self.engine, self.G_LM, self.results = engine, G_LM, results
        self.running: dict[int, Reported] = {}

    def run(self, commands: Connection) -> None:
        while True:
            block = not self.running
            while commands.poll(None if block else 0):
                block = False
                if not self.apply(commands.recv()):
                    return
            if self.running:
                self.step()

    def apply(self, command: Submit | Cancel | Stop) -> bool:
        """Apply one command; False for `Stop`."""
        if isinstance(command, Stop):
            return False
        if isinstance(command, Submit):
            try:
                req = self.engine.submit(list(command.prompt), command.max_new_tokens,
                                         G_LM=self.G_LM, **command.sampling.keywords())
            except PLDRError as e:  # the request's fault: tell its handler, run on
                self.results.send(Step(updates=(Update(command.id, done=True, failure=Failure(
                    "refused", str(e), e.param)),)))
            else:
                self.running[command.id] = Reported(command.id, req)
        elif isinstance(command, Cancel):
            reported = self.running.pop(command.id, None)
            if reported is not None:
                self.engine.cancel(reported.request)
        return True

    def step(self) -> None:
        self.engine.step()
        ids, updates = [], []
        for id, reported in list(self.running.items()):
            update = reported.update()
            if isinstance(update, tuple):
                ids.append(update)
            elif update is not None:
                updates.append(update)
                if update.done:
                    del self.running[id]
        if ids or updates:
            self.results.send(Step(tuple(ids), tuple(updates)))
