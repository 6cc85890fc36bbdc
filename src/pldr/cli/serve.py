"""`pldr serve`: the OpenAI-compatible HTTP server (needs the `serve` extra)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable

from ..devices import INFERENCE_DTYPES
from ..errors import PLDRError, missing_extra
from .common import add_model_args, load_tokenizer_arg

log = logging.getLogger("pldr")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="POST /v1/completions (streaming with server-sent events), "
                       "GET /v1/models, /health and /metrics (Prometheus), over continuous "
                       "batching. Binds 127.0.0.1 unless told otherwise.")
    add_model_args(p, G_LM_help="predefined G_LM used for every request instead of the model's own",
                   dtypes=INFERENCE_DTYPES,
                   dtype_help="float32, bfloat16, or int8 (CPU; int8 weights, activations "
                   "rounded to int8 per call)")
    p.add_argument("--served-model-name", "--model-name", dest="model_name", metavar="NAME",
                   help="the id clients send as `model` and GET /v1/models lists (default: "
                   "the model folder's name, or for a training run's RUN/final the run's "
                   "name, RUN)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (slots)")
    p.add_argument("--max-len", type=int, help="positions each slot holds, prompt and new "
                   "tokens (default: the model's max_seq_len; lower it to shrink the KV cache)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--api-key", default=os.environ.get("PLDR_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $PLDR_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM/SIGINT")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--threads", type=int,
                   help="torch threads for the model (default: the CPU cores less one, at "
                   "least 1: the event loop needs a core of its own, and model threads that "
                   "compete with it for cores stall each other)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    for name in ("max_batch", "max_len", "max_queue", "max_body_bytes", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PLDRError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise PLDRError(f"--port must lie in [0, 65535], got {args.port}")
    if not args.shutdown_timeout >= 0:
        raise PLDRError("--shutdown-timeout must be >= 0 seconds")
    try:
        import uvicorn  # noqa: F401  (the serve extra: checked before the model loads)

        from ..serve import ServeSettings, create_app
    except ImportError as e:
        raise missing_extra("pldr serve", "serve", e.name) from None
    from ..checkpoint.load import checkpoint_layout
    from ..serve import EngineRunner, EngineSpec

    tokenizer = load_tokenizer_arg(args, "pldr serve and its text prompts")
    _check_port(args.host, args.port)  # before the model loads, not after
    spec = EngineSpec(model=args.model, config=args.config, G_LM=args.G_LM, device=args.device,
                      dtype=args.dtype, max_batch=args.max_batch, max_len=args.max_len,
                      compile=args.compile,
                      threads=args.threads or default_threads())
    runner = EngineRunner(spec, args.max_queue)
    runner.start()  # the model loads in the engine process; a failure is one line here
    try:
        if tokenizer.vocab_size > runner.config.vocab_size:
            raise PLDRError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model "
                            f"only {runner.config.vocab_size}; pass the model's own tokenizer")
        name = args.model_name or served_model_name(args.model)
        settings = ServeSettings(model_name=name, max_queue=args.max_queue,
                                 api_key=args.api_key, max_body_bytes=args.max_body_bytes)
        what = (f"serving {name!r} (layout {checkpoint_layout(args.model)}, {runner.dtype}, "
                f"from {args.model})")
        key = "API key required (--api-key / PLDR_API_KEY)" if args.api_key else "no API key required"
        _run_server(create_app(runner, tokenizer, settings), args.host, args.port,
                    args.shutdown_timeout,
                    on_start=lambda url: log.info("%s at %s/v1; %s", what, url, key))
    finally:
        runner.stop()
    return 0


def served_model_name(model: str) -> str:
    """The default model id: the model folder's (or file's) name, except that a training
    run's final model (RUN/final, beside RUN/train_config.json) is named after the run, as
    every run's final folder is called "final"."""
    from pathlib import Path

    from ..training.prepare import TRAIN_CONFIG_FILE
    from ..training.checkpointing import FINAL

    path = Path(model).absolute()
    if path.name == FINAL and (path.parent / TRAIN_CONFIG_FILE).is_file():
        return path.parent.name
    return path.name


def _check_port(host: str, port: int) -> None:
    """A port that cannot be listened on is a one-line error, not uvicorn's log line."""
    import socket

    if port == 0:
        return  # any free port
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise PLDRError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                        "--port (or --host)") from None


def default_threads() -> int:
    """Torch threads that leave one of this process's cores to the event loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def _run_server(app, host: str, port: int, shutdown_timeout: float,
                on_start: Callable[[str], None] = lambda url: None) -> None:
    """uvicorn until SIGTERM/SIGINT: it stops accepting, lets running requests finish (up to
    `shutdown_timeout` seconds) and returns, so the command exits 0. `on_start(url)` is
    called once it listens (the URL has the port it got, for --port 0)."""
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and self.servers and self.servers[0].sockets:
                bound = self.servers[0].sockets[0].getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                on_start(f"http://{shown}:{bound}")

        # uvicorn raises a signal that stopped it once more on the way out (exit status
        # -15); a stop the operator asked for is a normal end here
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                  timeout_graceful_shutdown=shutdown_timeout)).run()
