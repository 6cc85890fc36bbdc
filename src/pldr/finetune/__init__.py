"""Fine-tuning: task data (tasks.py, data.py), metrics (metrics.py), evaluation
(evaluate.py) and the run (runner.py: `finetune(FinetuneConfig(...))`, the training loop of
pldr.training with the fine-tuning hooks). LoRA adapters and adapter directories live in
pldr.checkpoint.adapters, since `load_model` reads them."""

from typing import Any

from .config import DEFAULT_LORA_TARGETS, FinetuneConfig


def __getattr__(name: str) -> Any:
    """`finetune`, `score` and `evaluate` import the training stack on first use only (the
    CLI's parser reads FinetuneConfig without it)."""
    if name in ("finetune", "score"):
        from . import runner

        return getattr(runner, name)
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(f"module 'pldr.finetune' has no attribute {name!r}")


__all__ = ["FinetuneConfig", "DEFAULT_LORA_TARGETS", "finetune", "score", "evaluate"]
