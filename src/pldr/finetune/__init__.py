"""Fine-tuning: task data (tasks.py, data.py), metrics (metrics.py), evaluation
(evaluate.py) and the run (runner.py: `finetune(FinetuneConfig(...))`, the training loop of
pldr.training with the fine-tuning hooks). LoRA adapters and adapter directories live in
pldr.checkpoint.adapters, since `load_model` reads them."""

from .config import DEFAULT_LORA_TARGETS, FinetuneConfig
from .evaluate import evaluate
from .runner import finetune

__all__ = ["FinetuneConfig", "DEFAULT_LORA_TARGETS", "finetune", "evaluate"]
