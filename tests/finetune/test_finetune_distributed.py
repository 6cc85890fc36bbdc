"""LoRA fine-tuning under torchrun: 2 ranks (gloo, FSDP2) equal 1 process that takes each
global batch as the same two halves (as pretraining checks it): the same losses, the same
evaluation, the same adapter weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_utils import free_port
import torch

from finetune_data import sequence_rows, write_jsonl
from pldr.finetune import FinetuneConfig, finetune
from pldr.training.metrics import read_metrics
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(task="sequence-classification", batch_size=8, lr=1e-3, warmup_steps=2,
                max_steps=6, log_every=1, eval_every=3, max_length=48, lora_r=4,
                lora_targets="wq,wv,gluw1")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def test_two_ranks_equal_one_process(base, tmp_path):
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", sequence_rows(64, 0))
    val = write_jsonl(tmp_path / "val.jsonl", sequence_rows(13, 1))  # not a multiple of 2
    common = dict(model=base["model"], data=train, eval_data=val, **SETTINGS)
    args = ["finetune", "--out", str(tmp_path / "two"), "--no-progress", "--no-tensorboard"]
    for key, value in common.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "pldr", *args],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = finetune(FinetuneConfig(out=str(tmp_path / "one"), micro_batch_size=4,
                                  progress=False, tensorboard=False, **common))
    two = read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one.records]
    for a, b in zip(two, one.records):
        for key in ("loss", "accuracy", "macro_f1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    got = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    want = load_file(one.final_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        # Adam turns the rounding of near-zero gradients summed in another order into
        # updates of lr size: equal to 1e-4 of the tensor's largest weight
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4 * max(scale, 1e-3),
                                   msg=lambda m: f"{k}: {m}")
