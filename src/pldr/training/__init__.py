"""Training: `TrainConfig` (config.py), run preparation (prepare.py), the loop (trainer.py),
a step's sums (stats.py), resumable state and the final export (checkpointing.py), the
learning-rate schedule (schedule.py), metrics (metrics.py) and the process group, FSDP2 and
DCP tensor I/O (distributed.py)."""

from .config import TrainConfig
from .trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
