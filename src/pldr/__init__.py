"""pldr: PLDR-LLMs (Large Language Models from Power Law Decoder Representations) on PyTorch.

Only the public names of INTERFACE.md are re-exported here.
"""

from .checkpoint import load_G_LM, load_model, save_G_LM
from .config import PLDRConfig
from .data import Tokenizer
from .errors import CheckpointError, ConfigError, DataError, PLDRError
from .inference import Engine, generate, stream
from .model import (
                    Deductive,
                    InferenceCache,
                    PLDRForQuestionAnswering,
                    PLDRForSequenceClassification,
                    PLDRForTokenClassification,
                    PLDRModel,
                    PLDROutput,
                    dag_values,
                    infer_G_LM,
                    loss_with_dag,
                    masked_accuracy,
                    masked_loss,
                    to_v510G,
)

__all__ = [
    "PLDRConfig", "PLDRError", "ConfigError", "CheckpointError", "DataError",
    "PLDRModel", "PLDROutput", "PLDRForSequenceClassification", "PLDRForTokenClassification",
    "PLDRForQuestionAnswering", "Deductive", "infer_G_LM", "to_v510G", "InferenceCache",
    "masked_loss", "masked_accuracy", "dag_values", "loss_with_dag",
    "load_model", "load_G_LM", "save_G_LM", "generate", "stream", "Engine", "Tokenizer",
]
__version__ = "0.1.0"
