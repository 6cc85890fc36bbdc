"""Inference: sampling (sampling.py) and the static-batch generation API `generate` /
`stream` (generate.py)."""

from .generate import CACHE_MODES, generate, stream
from .sampling import SamplingConfig

__all__ = ["generate", "stream", "CACHE_MODES", "SamplingConfig"]
