"""The original's learning-rate schedule: linear warm-up from 0, then cosine decay to
`alpha * lr` at `total_steps`.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, alpha: float) -> float:
    """The learning rate of optimizer update number `step` (1, 2, ...), as the original:
    linear warm-up lr * step / warmup_steps while step < warmup_steps, then cosine decay from lr
    to alpha * lr, reached at step `total_steps` and held after it."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (alpha + (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * progress)))
