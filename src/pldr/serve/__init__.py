"""`pldr serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the
continuous-batching engine. app.py holds the routes, runner.py the engine process (the model
runs in a process of its own), schemas.py the request checks and OpenAI's error shape,
metrics.py the Prometheus metrics."""

from .app import ServeSettings, create_app
from .runner import EngineRunner, EngineSpec

__all__ = ["create_app", "ServeSettings", "EngineRunner", "EngineSpec"]
