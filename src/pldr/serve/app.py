"""The OpenAI-compatible HTTP app: `/v1/completions` (plain and streamed), `/v1/models`,
`/health` and `/metrics`, over the continuous-batching engine run by `EngineRunner`.

A completion request is checked (schemas.py), encoded, split into one engine request per
prompt and choice, and answered from the tokens the engine process sends back: all at once,
or as server-sent events while they are made. A client that goes away cancels its requests,
which frees their slots.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.generate import positions_needed
from .metrics import ServerMetrics
from .runner import EngineRunner, EngineStopped, Job, QueueFull
from .schemas import CompletionRequest, RequestError, error_body, parse_completion

log = logging.getLogger("pldr")
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: ample for prompts within max_seq_len


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_queue: int = 256
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY


class Choice:
    """The text of one choice as its ids arrive: stop strings cut it, and streaming holds back
    what might still turn out to be a stop string or half a multi-byte character."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos_id: int):
        self.tokenizer, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False  # a stop string or EOS ended it
        self.done = False
        # incremental decoding: ids[:_read] are in _committed for good; ids from _prefix on
        # are decoded again as more arrive (one id of context, for SentencePiece's spaces)
        self._committed, self._prefix, self._read = "", 0, 0

    def _decode(self) -> str:
        """The text of all ids so far, decoding only the ids since the last whole character
        (with the id before them as context), so a token costs the same at any length."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        now = decode(self.ids[self._prefix:])
        tail = now[len(before):]
        if tail and not now.endswith("\ufffd"):  # whole characters: commit them
            self._committed += tail
            self._prefix, self._read = self._read, len(self.ids)
            return self._committed
        return self._committed + tail

    def add(self, ids: list[int], done: bool) -> None:
        self.ids += ids
        text = self._decode()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped, done = text[:min(cuts)], True, True
        if self.ids and self.ids[-1] == self.eos_id:
            self.stopped = True
        self.text, self.done = text, done

    def new_text(self) -> str:
        """What may be shown now and was not shown yet."""
        end = len(self.text)
        if not self.done:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            # half a character decodes to one U+FFFD per byte so far: hold them all back
            end = min(end, len(self.text.rstrip("\ufffd")))
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else "length"


def create_app(runner: EngineRunner, tokenizer: Any, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving the started engine process `runner` with `tokenizer`; the app
    stops the process when the server shuts down."""
    config, limit = runner.config, runner.max_len
    metrics = ServerMetrics(lambda: runner.waiting, lambda: runner.running)
    runner.on_finish = lambda job: _observe(metrics, job)
    created = int(time.time())
    # completion ids: unique per server (a random run prefix and a counter), without a
    # urandom call per request as uuid4 makes
    run_id, counter = secrets.token_hex(8), itertools.count()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.stop()  # after uvicorn has drained the running requests

    app = FastAPI(title="pldr", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.runner, app.state.metrics = runner, metrics

    # ----- errors in OpenAI's shape, never a traceback ------------------------------------

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), e.status,
                            headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not "
                   f"allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, message), e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(500, "internal error; see the server log"), 500)

    app.add_middleware(GuardV1, settings=settings, metrics=metrics)

    # ----- routes --------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if runner.error is not None:
            return JSONResponse(error_body(503, f"the engine stopped: {runner.error}"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": created,
             "owned_by": "pldr", "max_model_len": limit}]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        if runner.error is not None:
            raise engine_stopped(runner.error)
        req = parse_completion(await _json_body(request), settings.model_name)
        prompts = [_encode(p, tokenizer, config, limit, req.max_tokens) for p in req.prompts]
        jobs = _submit(runner, prompts, req, asyncio.get_running_loop())
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        choices = [Choice(tokenizer, req.stop, config.eos_id) for _ in jobs]
        head = {"id": f"cmpl-{run_id}{next(counter):08x}", "object": "text_completion",
                "created": int(time.time()), "model": settings.model_name}
        echoes = [tokenizer.decode(prompts[i // req.n]) if req.echo else ""
                  for i in range(len(jobs))]
        if req.stream:
            return StreamingResponse(
                _stream(request, runner, metrics, jobs, choices, echoes, head, req, prompts),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not await _collect(request, runner, metrics, jobs, choices):
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse({**head, "choices": [
            {"text": echoes[i] + c.text, "index": i, "logprobs": None,
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(prompts, choices)})

    return app


# ----- request handling ----------------------------------------------------------------------

class GuardV1:
    """ASGI middleware for /v1: the API key and the body-size limit are checked before the
    route runs, and every response is counted by status. (A plain ASGI class, so streamed
    responses and client disconnects pass through untouched.)"""

    def __init__(self, app: Any, settings: ServeSettings, metrics: ServerMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            self._check_key(headers.get("authorization", ""))
            receive = self._limited(headers.get("content-length"), receive)
        except RequestError as e:
            response = JSONResponse(error_body(e.status, e.message, e.param, e.code), e.status)
            await response(scope, receive, counting_send)
        else:
            await self.app(scope, receive, counting_send)
        self.metrics.requests.labels(str(status["code"])).inc()

    def _check_key(self, given: str) -> None:
        """`Authorization: Bearer KEY`, compared in constant time."""
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), key.encode()):
            raise RequestError(401, "a valid API key is required: send 'Authorization: "
                               "Bearer KEY'", code="invalid_api_key")

    def _limited(self, length: str | None, receive: Any) -> Any:
        """Refuse a declared size over the limit now, and a chunked body once it passes it."""
        limit = self.settings.max_body_bytes
        too_big = RequestError(413, f"the request body is larger than {limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big
        seen = {"bytes": 0}

        async def limited_receive() -> dict:
            message = await receive()
            seen["bytes"] += len(message.get("body", b""))
            if seen["bytes"] > limit:
                raise too_big
            return message

        return limited_receive


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None


def _encode(prompt: str | list[int], tokenizer: Any, config: Any, limit: int,
            max_tokens: int) -> list[int]:
    """Prompt ids, checked against the vocabulary and the context length."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, eos=False)
        if not ids:
            raise RequestError(400, "the prompt encodes to no tokens", "prompt")
    else:
        ids = prompt
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise RequestError(400, f"token id {bad[0]} is outside the vocabulary [0, "
                               f"{config.vocab_size})", "prompt")
        if config.pad_id in ids:
            raise RequestError(400, f"token id {config.pad_id} is the pad id; it cannot be "
                               "part of a prompt", "prompt")
    if len(ids) >= limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                           f"{limit}", "prompt", "context_length_exceeded")
    if positions_needed(len(ids), max_tokens) > limit:
        room = limit - len(ids) + 1
        raise RequestError(400, f"max_tokens={max_tokens} does not fit: the prompt has "
                           f"{len(ids)} tokens of the context's {limit}, so at most {room}",
                           "max_tokens", "context_length_exceeded")
    return ids


def _submit(runner: EngineRunner, prompts: list[list[int]], req: CompletionRequest,
            loop: asyncio.AbstractEventLoop) -> list[Job]:
    """One engine request per prompt and choice (choice j samples with seed + j), all
    delivering into one queue of (choice index, new ids, done)."""
    jobs: list[Job] = []
    sink: asyncio.Queue = asyncio.Queue()
    try:
        for ids in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % (2**63)
                sampling = dict(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                seed=seed)
                job = Job(list(ids), req.max_tokens, sampling, loop, sink, len(jobs))
                if req.max_tokens == 0:
                    job.deliver([], True)  # nothing to generate: never reaches the engine
                else:
                    runner.submit(job)
                jobs.append(job)
    except EngineStopped as e:
        for job in jobs:
            runner.cancel(job)
        raise engine_stopped(e) from None
    except QueueFull:
        for job in jobs:
            runner.cancel(job)
        raise RequestError(429, f"the server's queue is full ({runner.max_queue} waiting); "
                           "retry later", headers={"Retry-After": "1"}) from None
    return jobs


async def _collect(request: Request, runner: EngineRunner, metrics: ServerMetrics,
                   jobs: list[Job], choices: list[Choice]) -> bool:
    """Wait for every choice to finish; False (and every job cancelled) if the client left."""
    sink = jobs[0].sink
    while not all(c.done for c in choices):
        try:
            i, ids, done = await asyncio.wait_for(sink.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                _cancel_all(runner, metrics, jobs)
                return False
            continue
        job, choice = jobs[i], choices[i]
        try:
            _raise_refusal(job)
        except RequestError:  # the whole request fails: its other choices stop too
            _cancel_unfinished(runner, jobs)
            raise
        if choice.done:
            continue  # a stop string ended it; the engine's last ids are not wanted
        choice.add(ids, done)
        if choice.done and not job_finished(job):
            runner.cancel(job)  # a stop string ended it early: free the slot now
    return True


def _raise_refusal(job: Job) -> None:
    """A request the engine refused (its checks are the last word) is the client's 400; one
    the model failed on (NaN logits) is the server's 500, for that request only."""
    if job.error is not None:
        if job.failure == "engine":
            raise engine_stopped(job.error)
        if job.failure == "model":
            raise RequestError(500, str(job.error), None, "model_error")
        raise RequestError(400, str(job.error), "prompt")


def engine_stopped(reason: object) -> RequestError:
    """The 503 of a request that comes after (or meets) the engine process's end."""
    return RequestError(503, f"the engine stopped ({reason}); restart the server",
                        code="engine_stopped")


def job_finished(job: Job) -> bool:
    return job.done or job.id < 0  # ended, or never submitted


async def _stream(request: Request, runner: EngineRunner, metrics: ServerMetrics,
                  jobs: list[Job], choices: list[Choice], echoes: list[str], head: dict,
                  req: CompletionRequest, prompts: list[list[int]]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text per choice, then `data: [DONE]`.
    What has arrived by the time the stream wakes goes out in one write."""
    sink, events = jobs[0].sink, Events(head)
    finished = 0
    try:
        out = [events.chunk(i, echo, None) for i, echo in enumerate(echoes) if echo]
        if out:
            yield "".join(out)
        while finished < len(jobs):
            out = []
            batch = [await sink.get()]
            while not sink.empty():
                batch.append(sink.get_nowait())
            for i, ids, done in batch:
                choice = choices[i]
                if choice.done:  # a stop string or an error ended it: later ids are not wanted
                    continue
                if jobs[i].error is not None:  # headers are sent: end the choice with it
                    choice.done, choice.text, choice.stopped = True, "", True
                    finished += 1
                    out.append(events.chunk(i, "", "error"))
                    continue
                choice.add(ids, done)
                text = choice.new_text()
                if choice.done:
                    finished += 1
                    if not job_finished(jobs[i]):
                        runner.cancel(jobs[i])
                    out.append(events.chunk(i, text, choice.finish_reason))
                elif text:
                    out.append(events.chunk(i, text, None))
            if finished == len(jobs):
                if req.include_usage:
                    out.append("data: " + json.dumps({**head, "choices": [],
                                                      "usage": _usage(prompts, choices)}) + "\n\n")
                out.append("data: [DONE]\n\n")
            if out:
                yield "".join(out)
    except (asyncio.CancelledError, GeneratorExit):
        _cancel_all(runner, metrics, jobs)
        raise


class Events:
    """The server-sent event of a stream's chunk, from a prefix rendered once per request
    (only the text and the finish reason change from one chunk to the next)."""

    def __init__(self, head: dict):
        self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"text": '

    def chunk(self, index: int, text: str, finish_reason: str | None) -> str:
        return (f'{self.prefix}{json.dumps(text)}, "index": {index}, "logprobs": null, '
                f'"finish_reason": {json.dumps(finish_reason)}}}]}}\n\n')


def _cancel_all(runner: EngineRunner, metrics: ServerMetrics, jobs: list[Job]) -> None:
    """The client left: stop its jobs and count it as cancelled if any was still running."""
    if _cancel_unfinished(runner, jobs):
        metrics.cancelled.inc()


def _cancel_unfinished(runner: EngineRunner, jobs: list[Job]) -> int:
    """Cancel the jobs that have not ended; returns how many there were."""
    left = [job for job in jobs if not job_finished(job)]
    for job in left:
        runner.cancel(job)
    return len(left)


def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _observe(metrics: ServerMetrics, job: Job) -> None:
    """Per-request figures, recorded when a request ends (on the runner's reader thread)."""
    metrics.generated_tokens.inc(job.sent)
    if job.first_token_at is not None:
        metrics.ttft.observe(job.first_token_at - job.submitted_at)
        if job.sent > 1 and job.last_token_at is not None:
            metrics.tpot.observe((job.last_token_at - job.first_token_at) / (job.sent - 1))
