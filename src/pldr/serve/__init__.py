"""`pldr serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the
continuous-batching engine. app.py holds the routes, runner.py the engine thread, schemas.py
the request checks and OpenAI's error shape, metrics.py the Prometheus metrics."""

from .app import ServeSettings, create_app
from .runner import EngineRunner

__all__ = ["create_app", "ServeSettings", "EngineRunner"]
