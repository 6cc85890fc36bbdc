"""The model: power law graph attention (attention.py), the inference cache (cache.py), the
description of one call (call.py), `PLDRModel` and its outputs (model.py), and the losses
(losses.py). It imports only the leaves of `pldr` (config, errors, devices, files)."""

from .cache import CACHE_MODES, InferenceCache, stack_per_layer
from .heads import (
    PLDRForQuestionAnswering,
    PLDRForSequenceClassification,
    PLDRForTokenClassification,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .losses import dag_values, loss_with_dag, masked_accuracy, masked_loss
from .model import Deductive, PLDRModel, PLDROutput, infer_G_LM, to_v510G

__all__ = ["PLDRModel", "PLDROutput", "Deductive", "infer_G_LM", "to_v510G", "InferenceCache",
           "CACHE_MODES", "stack_per_layer", "masked_loss", "masked_accuracy", "dag_values",
           "loss_with_dag", "PLDRForSequenceClassification", "PLDRForTokenClassification",
           "PLDRForQuestionAnswering", "SequenceClassifierOutput", "TokenClassifierOutput",
           "QuestionAnsweringOutput"]
