"""Run by test_train_syncs.py (in-process, and under torchrun): a short training run whose host
reads of tensor values are counted per step; writes OUT/syncs-rank<R>.json, mapping the
trainer's step counter at each read to the number of reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sync_count import SyncCounter

from pldr.training import TrainConfig
from pldr.training.prepare import prepare_run
from pldr.training.trainer import Trainer


def count_syncs(cfg: TrainConfig) -> tuple[dict[int, int], str]:
    """step counter -> host reads while it had that value (the end of step s and the start
    of step s + 1 up to its update), and the reads as text for a failing test."""
    trainer = Trainer(prepare_run(cfg))
    with SyncCounter(label=lambda: trainer.step) as syncs:
        trainer.run()
    return dict(syncs.by_label()), syncs.describe()


if __name__ == "__main__":
    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    by_step, text = count_syncs(cfg)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(cfg.out) / f"syncs-rank{rank}.json"
    out.write_text(json.dumps({"by_step": by_step, "text": text}))
