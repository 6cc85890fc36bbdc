"""pldr: PLDR-LLMs (Large Language Models from Power Law Decoder Representations) on PyTorch.

Only the public names of INTERFACE.md are re-exported here.
"""

from .config import PLDRConfig
from .errors import CheckpointError, ConfigError, DataError, PLDRError
from .cache import GCache, KVCache
from .losses import dag_values, loss_with_dag, masked_accuracy, masked_loss
from .model import Deductive, PLDRModel, PLDROutput, infer_G_LM, to_v510G

__all__ = [
    "PLDRConfig", "PLDRError", "ConfigError", "CheckpointError", "DataError",
    "PLDRModel", "PLDROutput", "Deductive", "infer_G_LM", "to_v510G", "KVCache", "GCache",
    "masked_loss", "masked_accuracy", "dag_values", "loss_with_dag",
]
__version__ = "0.1.0"
