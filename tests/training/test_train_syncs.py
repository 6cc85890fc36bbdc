"""Host-device syncs of the training loop, counted on the CPU (tests/sync_count.py): a step
that neither logs, evaluates nor checkpoints reads no tensor value back, on one process and
on two under torchrun; the steps that log read their figures (so the counter does see them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_utils import free_port
import torch

from pldr import PLDRConfig
from pldr.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from sync_run import count_syncs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_layers=1, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
             A_dff=16, max_seq_len=64)
LOG_EVERY = 4
# the trainer's step counter while steps 2-3 and 6-7 run whole (and 1 and 5 end): none of
# them logs (4 and 8 do), evaluates or checkpoints (at the end only)
QUIET = (1, 2, 5, 6)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("syncs")
    tok = root / "tok.model"
    Tokenizer.train(load_documents("builtin", "train[:10%]"), 512).save(tok)
    model_json = root / "model.json"
    PLDRConfig.preset("tiny").replace(**SMALL).to_json(model_json)
    return {"tokenizer": str(tok), "model": str(model_json), "cache": str(root / "cache")}


def cfg(shared: dict, out: Path, **changes) -> TrainConfig:
    return TrainConfig(model=shared["model"], tokenizer=shared["tokenizer"], out=str(out),
                       data="builtin", split="train[:10%]", val_split="none", max_steps=8,
                       batch_size=4, context_length=32, lr=1e-3, warmup_steps=0,
                       log_every=LOG_EVERY, cache_dir=shared["cache"], progress=False,
                       tensorboard=False).replace(**changes)


def check(by_step: dict[int, int], text: str) -> None:
    quiet = {s: by_step.get(s, 0) for s in QUIET}
    assert all(n == 0 for n in quiet.values()), f"syncs on quiet steps {quiet}:\n{text}"
    assert by_step.get(LOG_EVERY, 0) >= 1  # the logging step reads its figures


@pytest.mark.parametrize("mode,extra", [("pack", {}), ("pad", {"grad_accum": 2}),
                                        ("pack", {"dag_coeffs": (0.0, 0.0, 0.01)})])
def test_non_logging_steps_do_not_sync_on_one_process(shared, tmp_path, mode, extra):
    by_step, text = count_syncs(cfg(shared, tmp_path / "run", chunk_mode=mode, **extra))
    check(by_step, text)


@pytest.mark.skipif(not torch.distributed.is_available(),
                    reason="torch.distributed is not available")
def test_non_logging_steps_do_not_sync_on_two_processes(shared, tmp_path):
    out = tmp_path / "two"
    settings = cfg(shared, out, chunk_mode="pad").to_dict()
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(Path(__file__).parent / "sync_run.py"),
           json.dumps(settings)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((out / f"syncs-rank{rank}.json").read_text())
        check({int(k): v for k, v in got["by_step"].items()}, got["text"])
