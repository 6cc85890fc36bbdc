"""`pldr serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the
continuous-batching engine. app.py holds the routes, choice.py the `Choice` (the one owner of
a served choice's state: its lifecycle and what was shown), runner.py the engine process (the
model runs in a process of its own) and the server's side of its pipes, messages.py the typed
messages between the two, schemas.py the request checks and OpenAI's error shape, metrics.py
the Prometheus metrics."""

from .app import ServeSettings, create_app
from .runner import EngineRunner, EngineSpec

__all__ = ["create_app", "ServeSettings", "EngineRunner", "EngineSpec"]
