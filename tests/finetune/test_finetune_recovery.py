"""Fine-tuning resumes exactly after kill -9: the token classifier (whose dropout draws from
(seed, step, rank)) is killed inside a checkpoint save, resumed with --resume auto, and logs
every figure (evaluations included) and ends with every weight (final and best) of a run
never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from finetune_data import token_rows, write_jsonl
from pldr.cli import main as cli_main
from pldr.finetune import FinetuneConfig, finetune
from pldr.training.checkpointing import list_checkpoints
from pldr.training.metrics import read_metrics
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
# argv[1]: "step:K" dies right after optimizer step K, "save:N" inside the N-th checkpoint
# save once the DCP shards are written (before the trainer state); argv[2:]: pldr's argv
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
import pldr.training.distributed as ptd
from pldr.finetune.runner import FinetuneTrainer
from pldr.cli import main

mode, value = sys.argv[1].split(":")
step_of, save_of, saves = FinetuneTrainer._train_step, ptd.save_sharded, [0]

def train_step(self, micro):
    out = step_of(self, micro)
    if mode == "step" and self.step == int(value):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def save_sharded(*args):
    save_of(*args)
    saves[0] += 1
    if mode == "save" and saves[0] == int(value):
        os.kill(os.getpid(), signal.SIGKILL)

FinetuneTrainer._train_step, ptd.save_sharded = train_step, save_sharded
sys.exit(main(sys.argv[2:]))
"""
SETTINGS = dict(task="token-classification", batch_size=8, lr=5e-3, warmup_steps=2,
                max_steps=9, log_every=1, save_every=3, eval_every=3, max_length=48,
                keep_checkpoints=0)


def figures(records: list[dict]) -> list[tuple]:
    """What a record says about training (the throughput figures are the clock's)."""
    return [tuple(sorted((k, v) for k, v in r.items() if k != "tokens_per_s"))
            for r in records]


def test_kill_9_then_resume_reproduces_the_run(base, tmp_path):
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", token_rows(80, 0))
    val = write_jsonl(tmp_path / "val.jsonl", token_rows(16, 1))
    common = dict(model=base["model"], data=train, eval_data=val, progress=False,
                  tensorboard=False, **SETTINGS)
    reference = finetune(FinetuneConfig(out=str(tmp_path / "ref"), **common))
    out = tmp_path / "run"
    command = ["finetune", "--out", str(out), "--no-progress", "--no-tensorboard"]
    for key, value in common.items():
        if key not in ("progress", "tensorboard"):
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # killed inside the second save (step 6): its shards are on disk, its state is not
    proc = subprocess.run([sys.executable, "-c", KILLER, "save:2", *command],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [c.name for c in list_checkpoints(out)] == ["step-00000003"]
    assert list((out / "checkpoints").glob(".tmp-*"))
    assert cli_main(["finetune", "--resume", "auto", "--out", str(out)]) == 0
    assert figures(read_metrics(out)) == figures(reference.records)
    for name in ("final", "best"):
        got = load_file(out / name / "model.safetensors")
        want = load_file(tmp_path / "ref" / name / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
