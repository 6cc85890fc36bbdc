"""The `/v1/completions` and tokenizer requests, checked field by field, and OpenAI's
error shape.

Every check names the field (`param`) so a client sees which one to change; nothing here
touches the model. Fields OpenAI defines that this server cannot honour (best_of, suffix,
penalties, logit_bias) are refused with a 400 unless they carry their neutral value, rather
than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..inference.checks import MAX_LOGPROBS  # the engine's bound (vLLM's default; OpenAI: 5)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}
MAX_N = 16
MAX_STOPS = 16  # OpenAI takes 4; lm-eval sends a task's stop strings and its EOS string
SEED_LIMIT = 2**63
# OpenAI fields accepted only with their neutral value (the server cannot do otherwise)
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
           "logit_bias": (None, {})}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
         "stream", "stream_options", "n", "echo", "user", "logprobs"} | set(NEUTRAL)


class RequestError(Exception):
    """A request the server refuses: HTTP status, message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request. `prompts` holds text or id lists as sent; the app encodes them."""

    model: str
    prompts: list[str | list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    n: int
    echo: bool
    logprobs: int | None  # most likely tokens to report per position (None: no logprobs)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    x = body.get(name, default)
    if x is None:
        return default
    if not (_is_int(x) or isinstance(x, float)) or not math.isfinite(x):
        raise RequestError(400, f"{name} must be a finite number, got {x!r}", name)
    if x < low or (low_open and x == low) or x > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"{name} must lie in {bounds}, got {x!r}", name)
    return float(x)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    x = body.get(name, default)
    if x is None:
        return default
    if not _is_int(x):
        raise RequestError(400, f"{name} must be an integer, got {x!r}", name)
    if not low <= x <= high:
        raise RequestError(400, f"{name} must lie in [{low}, {high}], got {x}", name)
    return x


def _flag(body: dict, name: str) -> bool:
    x = body.get(name, False)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise RequestError(400, f"{name} must be true or false, got {x!r}", name)
    return x


def _prompts(x: Any) -> list[str | list[int]]:
    """A text, a list of texts, a list of ids or a list of id lists -> list of prompts."""
    if isinstance(x, str):
        items: list = [x]
    elif isinstance(x, list) and x and all(_is_int(t) for t in x):
        items = [x]
    elif isinstance(x, list) and x and all(isinstance(p, str) for p in x):
        items = list(x)
    elif isinstance(x, list) and x and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                           for p in x):
        items = list(x)
    else:
        raise RequestError(400, "prompt must be a string, a list of strings, a list of token "
                           "ids or a list of token id lists", "prompt")
    for i, p in enumerate(items):
        if len(p) == 0:
            raise RequestError(400, f"prompt {i} is empty; give at least one token", "prompt")
    return items


def _stops(x: Any) -> tuple[str, ...]:
    if x is None:
        return ()
    stops = [x] if isinstance(x, str) else x
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}",
                           "stop")
    return tuple(stops)


def _fields(body: Any, known: set[str]) -> dict:
    """`body` if it is a JSON object of `known` fields only."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(400, f"unrecognised request field {unknown[0]!r}", unknown[0])
    return body


def check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Every id of `ids` lies in [0, vocab_size)."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(400, f"token id {bad[0]} is outside the vocabulary [0, "
                           f"{vocab_size})", param)


def parse_completion(body: Any, model_name: str) -> CompletionRequest:
    """Check a decoded JSON body against the schema; raise RequestError naming the field."""
    body = _fields(body, KNOWN)
    for name, allowed in NEUTRAL.items():
        if name in body and body[name] not in allowed:
            raise RequestError(400, f"{name} is not supported by this server; leave it out",
                               name)
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string naming the served model", "model")
    _served_model(body, model_name)
    if "prompt" not in body:
        raise RequestError(400, "prompt is required", "prompt")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise RequestError(400, "stream_options takes only include_usage (true or false)",
                           "stream_options")
    if isinstance(body.get("user"), (int, float, list, dict)):
        raise RequestError(400, "user must be a string", "user")
    top_k = _integer(body, "top_k", 0, -1, 2**31 - 1)
    return CompletionRequest(
        model=model,
        prompts=_prompts(body["prompt"]),
        max_tokens=_integer(body, "max_tokens", 16, 0, 2**31 - 1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k
        stop=_stops(body.get("stop")),
        seed=_integer(body, "seed", None, 0, SEED_LIMIT - 1),
        stream=_flag(body, "stream"),
        include_usage=bool((options or {}).get("include_usage", False)),
        n=_integer(body, "n", 1, 1, MAX_N),
        echo=_flag(body, "echo"),
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS),
    )


def _served_model(body: dict, model_name: str) -> None:
    """`model` is optional on the tokenizer routes (as in vLLM); if given it must match."""
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model {model!r} does not exist; this server serves "
                           f"{model_name!r} (GET /v1/models)", "model", "model_not_found")


def parse_tokenize(body: Any, model_name: str) -> str:
    """`POST /tokenize` (vLLM's shape): {"prompt": text, "add_special_tokens": bool} -> the
    text. add_special_tokens is checked but adds nothing: PLDR prompts have no BOS or EOS."""
    body = _fields(body, {"model", "prompt", "add_special_tokens"})
    _served_model(body, model_name)
    if not isinstance(body.get("prompt"), str):
        raise RequestError(400, "prompt must be a string", "prompt")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise RequestError(400, f"add_special_tokens must be true or false, got {special!r}",
                           "add_special_tokens")
    return body["prompt"]


def parse_detokenize(body: Any, model_name: str, vocab_size: int) -> list[int]:
    """`POST /detokenize` (vLLM's shape): {"tokens": [ids]} -> the ids."""
    body = _fields(body, {"model", "tokens"})
    _served_model(body, model_name)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise RequestError(400, "tokens must be a list of token ids", "tokens")
    check_ids(ids, vocab_size, "tokens")
    return ids
