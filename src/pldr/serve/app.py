"""The OpenAI-compatible HTTP app: `/v1/completions` (plain and streamed, with logprobs),
`/v1/models`, vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info` (which lm-eval's
`local-completions` reads), `/health` and `/metrics`, over the continuous-batching engine
run by `EngineRunner`.

A completion request is checked (schemas.py), encoded, and split into one `Choice` per
prompt and choice, each submitted to the engine; the runner hands each choice the ids the
engine process sends back, and the handler answers from the choices: all at once, or as
server-sent events while they are made (it wakes when any of its choices changes). A client
that goes away cancels its choices, which frees their slots.
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

from ..errors import PLDRError, render
from ..inference.generate import positions_needed
from .choice import WAITING, Choice, logprobs_json, prompt_scored
from .messages import Failure, Sampling
from .metrics import ServerMetrics
from .runner import EngineRunner, EngineStopped, QueueFull
from .schemas import (CompletionRequest, RequestError, check_ids, error_body, parse_completion,
                      parse_detokenize, parse_tokenize)

log = logging.getLogger("pldr")
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: ample for prompts within max_seq_len


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_queue: int = 256
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY


def create_app(runner: EngineRunner, tokenizer: Any, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving the started engine process `runner` with `tokenizer`; the app
    stops the process when the server shuts down."""
    config, limit = runner.config, runner.max_len
    metrics = ServerMetrics(lambda: runner.waiting, lambda: runner.running)
    runner.on_finish = lambda choice: _observe(metrics, choice)
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

    app.add_middleware(GuardAPI, settings=settings, metrics=metrics)

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
        scored = req.logprobs is not None
        changed = asyncio.Event()  # set by any of the request's choices when it changes
        echoes = [tokenizer.decode(prompts[i // req.n]) if req.echo else ""
                  for i in range(len(prompts) * req.n)]
        choices = [Choice(tokenizer, req.stop, config.eos_id, scored, prompts[i // req.n],
                          offset=len(echo), wake=changed.set) for i, echo in enumerate(echoes)]
        _submit(runner, prompts, req, choices)
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        head = {"id": f"cmpl-{run_id}{next(counter):08x}", "object": "text_completion",
                "created": int(time.time()), "model": settings.model_name}
        if req.stream:
            return StreamingResponse(
                _stream(runner, metrics, choices, changed, echoes, head, req, prompts,
                        tokenizer),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not await _collect(request, runner, metrics, choices, changed):
            return Response(status_code=499)  # the client left; nobody reads this

        def logprobs(i: int, c: Choice) -> dict | None:
            if not scored:
                return None
            echoed = (prompt_scored(tokenizer, prompts[i // req.n], c.prompt_logprobs)
                      if req.echo else [])
            return logprobs_json(tokenizer, echoed + c.scored())
        return JSONResponse({**head, "choices": [
            {"text": echoes[i] + c.text, "index": i, "logprobs": logprobs(i, c),
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(prompts, choices)})

    # ----- the tokenizer, as vLLM serves it (lm-eval's "remote" tokenizer) -----------------

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        ids = _encode_text(tokenizer, parse_tokenize(await _json_body(request),
                                                     settings.model_name))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": limit})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        ids = parse_detokenize(await _json_body(request), settings.model_name,
                               min(config.vocab_size, len(tokenizer)))
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        piece = tokenizer.id_to_piece
        # no bos_token: PLDR text has none, so lm-eval starts an empty context with EOS, as
        # its in-process `pldr` model does
        return JSONResponse({"tokenizer_class": "SentencePiece", "eos_token": piece(config.eos_id),
                             "bos_token": None, "pad_token": piece(config.pad_id),
                             "unk_token": piece(tokenizer.unk_id), "model_max_length": limit,
                             "vocab_size": config.vocab_size})

    return app


# ----- request handling ----------------------------------------------------------------------

GUARDED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")  # all but health, metrics


class GuardAPI:
    """ASGI middleware for the API routes (`GUARDED`): the API key and the body-size limit
    are checked before the route runs, and every response is counted by status. (A plain
    ASGI class, so streamed responses and client disconnects pass through untouched.)"""

    def __init__(self, app: Any, settings: ServeSettings, metrics: ServerMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
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
        ids = _encode_text(tokenizer, prompt)
        if not ids:
            raise RequestError(400, "the prompt encodes to no tokens", "prompt")
    else:
        ids = prompt
        check_ids(ids, config.vocab_size, "prompt")
        if config.pad_id in ids:
            raise RequestError(400, f"token id {config.pad_id} is the pad id; it cannot be "
                               "part of a prompt", "prompt")
    if len(ids) > limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                           f"{limit}", "prompt", "context_length_exceeded")
    if positions_needed(len(ids), max_tokens) > limit:
        room = limit - len(ids) + 1
        raise RequestError(400, f"max_tokens={max_tokens} does not fit: the prompt has "
                           f"{len(ids)} tokens of the context's {limit}, so at most {room}",
                           "max_tokens", "context_length_exceeded")
    return ids


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """A text prompt's ids as /tokenize gives them (special pieces' text becomes their ids);
    text the tokenizer refuses (not valid UTF-8) is the client's 400."""
    try:
        return tokenizer.encode(text, eos=False, parse_special=True)
    except PLDRError as e:
        raise RequestError(400, str(e), "prompt") from None


def _submit(runner: EngineRunner, prompts: list[list[int]], req: CompletionRequest,
            choices: list[Choice]) -> None:
    """One engine request per prompt and choice (choice j of a prompt samples with seed +
    j). Echo with logprobs asks for the prompt's too (with max_tokens 0: only those); a
    choice with nothing to compute never reaches the engine."""
    score_prompt = req.echo and req.logprobs is not None
    try:
        for i, choice in enumerate(choices):
            if req.max_tokens == 0 and not score_prompt:
                choice.add([], True)
                continue
            j = i % req.n
            seed = None if req.seed is None else (req.seed + j) % (2**63)
            sampling = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                seed=seed, logprobs=req.logprobs,
                                prompt_logprobs=req.logprobs if score_prompt else None)
            runner.submit(choice, prompts[i // req.n], req.max_tokens, sampling)
    except EngineStopped as e:
        _cancel_unfinished(runner, choices)
        raise engine_stopped(e) from None
    except QueueFull:
        _cancel_unfinished(runner, choices)
        raise RequestError(429, f"the server's queue is full ({runner.max_queue} waiting); "
                           "retry later", headers={"Retry-After": "1"}) from None


async def _collect(request: Request, runner: EngineRunner, metrics: ServerMetrics,
                   choices: list[Choice], changed: asyncio.Event) -> bool:
    """Wait for every choice to finish; False (and every choice cancelled) if the client
    left. A choice that failed fails the whole request, and its other choices stop."""
    while True:
        failed = next((c.failure for c in choices if c.failure is not None), None)
        if failed is not None:
            _cancel_unfinished(runner, choices)
            raise refusal(failed)
        if all(c.done for c in choices):
            return True
        try:
            await asyncio.wait_for(changed.wait(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                _cancel_all(runner, metrics, choices)
                return False
        changed.clear()


# The engine's Python parameters, as a completion request names them (its fields)
FIELDS = {"prompt": "prompt", "prompts": "prompt", "max_new_tokens": "max_tokens",
          "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "seed": "seed",
          "logprobs": "logprobs", "prompt_logprobs": "logprobs"}


def refusal(failure: Failure) -> RequestError:
    """A request the engine refused (its checks are the last word) is the client's 400,
    naming the field at fault (the prompt, unless the engine named another parameter);
    one the model failed on (NaN logits) is the server's 500, for that request only."""
    if failure.kind == "engine":
        return engine_stopped(failure.message)
    if failure.kind == "model":
        return RequestError(500, render(failure.message, FIELDS, "="), None, "model_error")
    return RequestError(400, render(failure.message, FIELDS, "="),
                        FIELDS.get(failure.param or "prompt", "prompt"))


def engine_stopped(reason: object) -> RequestError:
    """The 503 of a request that comes after (or meets) the engine process's end."""
    return RequestError(503, f"the engine stopped ({reason}); restart the server",
                        code="engine_stopped")


async def _stream(runner: EngineRunner, metrics: ServerMetrics, choices: list[Choice],
                  changed: asyncio.Event, echoes: list[str], head: dict,
                  req: CompletionRequest, prompts: list[list[int]],
                  tokenizer: Any) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text per choice, then `data: [DONE]`.
    What has arrived by the time the stream wakes goes out in one write. With logprobs a
    chunk carries those of the ids whose text it shows, and an echo waits for the prompt's
    logprobs (they come with the choice's first ids). A choice that fails after the
    headers went out ends with finish_reason "error"."""
    events, scored = Events(head), req.logprobs is not None
    echo_due = [bool(echo) for echo in echoes]
    closed = [False] * len(choices)  # its last chunk went out

    def echo_chunk(i: int) -> str:
        echo_due[i] = False
        entries = prompt_scored(tokenizer, prompts[i // req.n], choices[i].prompt_logprobs)
        return events.chunk(i, echoes[i], None,
                            logprobs_json(tokenizer, entries) if scored else None)

    def text_chunk(i: int, text: str, finish_reason: str | None) -> str:
        return events.chunk(i, text, finish_reason,
                            logprobs_json(tokenizer, choices[i].new_scored()) if scored else None)

    def chunks(i: int, choice: Choice) -> list[str]:
        if closed[i] or (choice.phase == WAITING and choice.prompt_logprobs is None):
            return []  # nothing new from the engine yet
        out = [echo_chunk(i)] if echo_due[i] else []
        if choice.failure is not None:
            closed[i] = True
            return out + [events.chunk(i, "", "error")]
        text = choice.new_text()
        if choice.done:
            closed[i] = True
            out.append(text_chunk(i, text, choice.finish_reason))
        elif text:
            out.append(text_chunk(i, text, None))
        return out

    try:
        out = [] if scored else [echo_chunk(i) for i in range(len(choices)) if echo_due[i]]
        while True:
            for i, choice in enumerate(choices):
                out += chunks(i, choice)
            if all(closed):
                if req.include_usage:
                    out.append("data: " + json.dumps({**head, "choices": [],
                                                      "usage": _usage(prompts, choices)}) + "\n\n")
                out.append("data: [DONE]\n\n")
                yield "".join(out)
                return
            if out:
                yield "".join(out)
            out = []
            await changed.wait()
            changed.clear()
    except BaseException:  # the client left (or a bug): its choices must not run on
        _cancel_all(runner, metrics, choices)
        raise


class Events:
    """The server-sent event of a stream's chunk, from a prefix rendered once per request
    (only the text, the logprobs and the finish reason change from one chunk to the next)."""

    def __init__(self, head: dict):
        self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": [{"text": '

    def chunk(self, index: int, text: str, finish_reason: str | None,
              logprobs: dict | None = None) -> str:
        return (f'{self.prefix}{json.dumps(text)}, "index": {index}, "logprobs": '
                f'{json.dumps(logprobs)}, "finish_reason": {json.dumps(finish_reason)}}}]}}\n\n')


def _cancel_all(runner: EngineRunner, metrics: ServerMetrics, choices: list[Choice]) -> None:
    """The client left: stop its choices and count it as cancelled if any was still running."""
    if _cancel_unfinished(runner, choices):
        metrics.cancelled.inc()


def _cancel_unfinished(runner: EngineRunner, choices: list[Choice]) -> int:
    """Cancel the choices that have not ended; returns how many there were."""
    left = [c for c in choices if not c.done]
    for choice in left:
        runner.cancel(choice)
    return len(left)


def _usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _observe(metrics: ServerMetrics, choice: Choice) -> None:
    """Per-choice figures, recorded when a submitted choice ends."""
    made = len(choice.ids)
    metrics.generated_tokens.inc(made)
    if choice.first_token_at is not None:
        metrics.ttft.observe(choice.first_token_at - choice.submitted_at)
        if made > 1 and choice.last_token_at is not None:
            metrics.tpot.observe((choice.last_token_at - choice.first_token_at) / (made - 1))
