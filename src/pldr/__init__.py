"""pldr: PLDR-LLMs (Large Language Models from Power Law Decoder Representations) on PyTorch.

Only the public names of INTERFACE.md are re-exported here.
"""

from .config import PLDRConfig
from .errors import CheckpointError, ConfigError, DataError, PLDRError

__all__ = ["PLDRConfig", "PLDRError", "ConfigError", "CheckpointError", "DataError"]
__version__ = "0.1.0"
