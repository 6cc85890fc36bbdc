"""Inference: sampling (sampling.py), input checks (checks.py), the generation API `generate` /
`stream` (generate.py) and continuous batching (engine.py)."""

from .engine import Engine, Request
from .generate import CACHE_MODES, generate, stream
from .sampling import SamplingConfig

__all__ = ["generate", "stream", "Engine", "Request", "CACHE_MODES", "SamplingConfig"]
