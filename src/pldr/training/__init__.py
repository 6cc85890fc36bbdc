"""Training: `TrainConfig` (config.py), the loop (trainer.py), resumable state
(checkpointing.py), the learning-rate schedule (schedule.py), metrics (metrics.py) and the
process group, FSDP2 and DCP (distributed.py)."""

from .config import TrainConfig
from .trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
