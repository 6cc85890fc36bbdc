"""How runs recover: an update that makes weights or outputs non-finite stops before its
checkpoint, and the checkpoint the error names resumes; a run that failed before its first
checkpoint restarts with the same command; resuming an earlier checkpoint into a run that
went on is refused unless asked; a damaged last checkpoint names the previous one."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from pldr import CheckpointError, PLDRConfig
from pldr.cli import main as cli_main
from pldr.training import TrainConfig, TrainingError, train
from pldr.training.checkpointing import list_checkpoints
from pldr.training.metrics import read_metrics

SMALL = dict(num_layers=1, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
             A_dff=16, max_seq_len=64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> dict:
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("recovery")
    path = root / "tok.model"
    Tokenizer.train(load_documents("builtin", "train[:10%]"), 512).save(path)
    return {"tokenizer": str(path), "cache": str(root / "cache")}


def cfg(tok: dict, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(model=PLDRConfig.preset("tiny").replace(**SMALL),
                       tokenizer=tok["tokenizer"], out=str(out), data="builtin",
                       split="train[:10%]", val_split="none", max_steps=6, batch_size=4,
                       context_length=32, lr=1e-3, warmup_steps=0, log_every=1,
                       cache_dir=tok["cache"], progress=False, tensorboard=False)
    return base.replace(**changes)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_huge_lr_stops_before_writing_a_bad_checkpoint(tok, tmp_path):
    out = tmp_path / "run"
    # good steps first, then lr 1e6 from the resumed checkpoint
    train(cfg(tok, out, max_steps=2, save_every=1))
    with pytest.raises(TrainingError) as err:
        train(cfg(tok, out, max_steps=6, save_every=1, lr=1e6, resume="auto"))
    message = str(err.value)
    assert "step-00000002" in message and "`resume=" in message  # the Python parameter
    assert [c.name for c in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    # the checkpoint the error names resumes, with a sane lr, and finishes
    named = ast.literal_eval(message.split("`resume=")[1].split("`")[0])
    result = train(cfg(tok, out, max_steps=4, save_every=1, resume=named))
    assert result.step == 4 and result.final_dir is not None
    assert all(r["loss"] == r["loss"] for r in read_metrics(out))  # no NaN logged


def test_huge_lr_on_a_fresh_run_restarts_with_the_same_command(tok, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        train(cfg(tok, out, lr=1e6, save_every=1))
    assert list_checkpoints(out) == []
    # the leftovers (settings, tokenizer, metrics) are pldr's own: the same command starts over
    result = train(cfg(tok, out, save_every=2))
    assert result.step == 6
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3, 4, 5, 6]


def test_cli_restarts_after_a_failure_before_step_1(tok, tmp_path, capsys, monkeypatch):
    import pldr.training.trainer as trainer_module

    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--tokenizer", tok["tokenizer"], "--out", str(out),
            "--split", "train[:10%]", "--val-split", "none", "--batch-size", "4",
            "--context-length", "32", "--max-steps", "2", "--no-progress", "--no-tensorboard",
            "--cache-dir", tok["cache"]]

    def crash(self, micro):
        raise TrainingError("simulated crash before step 1")

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_train_step", crash)
        assert cli_main(args) == 2
    assert "simulated crash" in capsys.readouterr().err
    assert cli_main(args) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_resuming_an_earlier_checkpoint_into_its_run_is_refused(tok, tmp_path):
    out = tmp_path / "run"
    train(cfg(tok, out, max_steps=4, save_every=1, keep_checkpoints=0))
    before = snapshot(out)
    first = list_checkpoints(out)[0]
    with pytest.raises(CheckpointError, match="`fork_to=NEW_DIR` .* `truncate_later_steps=True`"):
        train(cfg(tok, out, max_steps=4, resume=str(first)))
    assert snapshot(out) == before  # nothing rewritten

    # branching into a new folder leaves the run as it was
    fork = tmp_path / "fork"
    train(cfg(tok, fork, max_steps=3, resume=str(first)))
    assert snapshot(out) == before
    assert (fork / "final").is_dir()

    # asked explicitly: the later steps go, the resumed checkpoint is never pruned
    result = train(cfg(tok, out, max_steps=6, save_every=1, keep_checkpoints=2,
                       resume=str(first), truncate_later_steps=True))
    assert result.step == 6
    assert [c.name for c in list_checkpoints(out)] == ["step-00000001", "step-00000005",
                                                       "step-00000006"]
    steps = [r["step"] for r in read_metrics(out, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]


FIGURES = ("loss", "ce", "accuracy", "step_loss", "lr", "tokens")


def figures(records: list[dict]) -> list[tuple]:
    """What a resumed run must log exactly as an uninterrupted one (not the timings)."""
    return [(r["step"], r["split"], *(r.get(k) for k in FIGURES)) for r in records]


def test_fork_to_branches_into_a_new_folder_with_the_history(tok, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(tok, out, max_steps=4, save_every=2, keep_checkpoints=0))
    before = snapshot(out)
    second = out / "checkpoints" / "step-00000002"
    # the reference: continuing in place from step 2 (a copy of the run, rewound)
    in_place = tmp_path / "in_place"
    shutil.copytree(out, in_place)
    train(cfg(tok, in_place, max_steps=4, resume=str(in_place / second.relative_to(out)),
              truncate_later_steps=True))

    fork = tmp_path / "fork"
    args = ["train", "--resume", str(second), "--fork-to", str(fork), "--no-progress"]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert snapshot(out) == before  # the original run, byte for byte
    original = read_metrics(out)
    forked = read_metrics(fork)
    # the history up to the checkpoint is copied as it was logged, then the fork continues
    assert forked[:2] == [r for r in original if r["step"] <= 2]
    assert figures(forked) == figures(read_metrics(in_place)) == figures(original)
    saved = json.loads((fork / "train_config.json").read_text())
    assert saved["out"] == str(fork) and saved["resume"] == str(second)
    assert [c.name for c in list_checkpoints(fork)] == ["step-00000004"]
    assert (fork / "final" / "model.safetensors").is_file()
    # the fork is a run of its own: it continues with --resume auto, --fork-to not remembered
    assert cli_main(["train", "--resume", "auto", "--out", str(fork), "--max-steps", "5",
                     "--no-progress"]) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(fork, "train")] == [1, 2, 3, 4, 5]
    assert snapshot(out) == before
    # a second fork into a folder that holds a run, into the run itself, or without --resume
    for bad, message in ((["--resume", str(second), "--fork-to", str(fork)], "already holds"),
                         (["--resume", str(second), "--fork-to", str(out)], "own run"),
                         (["--fork-to", str(tmp_path / "new"), "--out", str(tmp_path / "x")],
                          "--resume")):
        capsys.readouterr()
        assert cli_main(["train", *bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert snapshot(out) == before and not (tmp_path / "new").exists()


def test_cli_truncate_flag_is_not_remembered(tok, tmp_path):
    out = tmp_path / "run"
    train(cfg(tok, out, max_steps=2, save_every=1, keep_checkpoints=0))
    first = list_checkpoints(out)[0]
    train(cfg(tok, out, max_steps=3, save_every=1, keep_checkpoints=0, resume=str(first),
              truncate_later_steps=True))
    state = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["train_config"]["truncate_later_steps"] is True
    from pldr.cli.train import config_from_flags

    assert config_from_flags({"resume": "auto", "out": str(out)}).truncate_later_steps is False


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "flip-config"])
def test_damaged_last_checkpoint_names_the_previous_one(tok, tmp_path, damage):
    out = tmp_path / "run"
    train(cfg(tok, out, max_steps=3, save_every=1))
    last = list_checkpoints(out)[-1]
    shard = next(p for p in last.iterdir() if p.suffix == ".distcp")
    if damage == "flip-config":
        shard = last / "config.json"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:100])
    elif damage == "delete":
        shard.unlink()
    else:  # one byte altered, the size unchanged: only the checksum can tell
        at = len(data) // 2 if damage == "flip" else data.index(b'"d_model"') + 2
        data[at] ^= 0x01
        shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        train(cfg(tok, out, max_steps=3, resume="auto"))
    assert "step-00000002" in str(err.value) and "step-00000003" in str(err.value)
    if damage.startswith("flip"):
        assert shard.name in str(err.value) and "sha256" in str(err.value)
    # the checkpoint it names resumes
    previous = list_checkpoints(out)[-2]
    shutil.rmtree(last)
    assert train(cfg(tok, out, max_steps=3, resume=str(previous))).step == 3


def test_a_failed_resume_leaves_the_run_folder_as_it_was(tok, tmp_path):
    out = tmp_path / "run"
    train(cfg(tok, out, max_steps=2, save_every=1))
    last = list_checkpoints(out)[-1]
    state_file = last / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]  # as if written before the manifest: only the read itself can fail
    state_file.write_text(json.dumps(state))
    shard = next(p for p in last.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="step-00000001"):
        train(cfg(tok, out, max_steps=4, resume=str(last)))
    assert snapshot(out) == before


# Runs `pldr train` (argv[2:]) in a child process that dies by SIGKILL at a chosen moment;
# nothing of training changes. argv[1]: "step:K" dies right after optimizer step K; "save:N"
# dies inside the N-th checkpoint save, once the DCP shards are written and before the
# trainer state; "slow:S" only sleeps S seconds after every step, so a kill from outside
# after a random delay lands mid-run.
KILLER = """
import os, signal, sys, time
import pldr.training.distributed as ptd
import pldr.training.trainer as trainer
from pldr.cli import main

mode, value = sys.argv[1].split(":")
step_of = trainer.Trainer._train_step

def train_step(self, micro):
    out = step_of(self, micro)
    if mode == "step" and self.step == int(value):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "slow":
        time.sleep(float(value))
    return out

saves, save_of = [0], ptd.save_sharded

def save_sharded(*args):
    save_of(*args)
    saves[0] += 1
    if mode == "save" and saves[0] == int(value):
        os.kill(os.getpid(), signal.SIGKILL)

trainer.Trainer._train_step, ptd.save_sharded = train_step, save_sharded
sys.exit(main(sys.argv[2:]))
"""


def test_kill_9_at_random_moments_then_resume_reproduces_the_run(tok, tmp_path):
    """kill -9 before the first checkpoint, during a save and at a seeded random moment;
    after each the same command (no checkpoint yet) or --resume auto continues, and the run
    logs exactly the figures and ends with exactly the weights of a run never killed."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    steps, every = 12, 3
    reference = train(cfg(tok, tmp_path / "ref", max_steps=steps, save_every=every))
    out = tmp_path / "run"
    model_json = tmp_path / "model.json"
    PLDRConfig.preset("tiny").replace(**SMALL).to_json(model_json)
    command = ["train", "--model", str(model_json), "--tokenizer", tok["tokenizer"],
               "--out", str(out), "--data", "builtin", "--split", "train[:10%]",
               "--val-split", "none", "--max-steps", str(steps), "--batch-size", "4",
               "--context-length", "32", "--lr", "1e-3", "--warmup-steps", "0",
               "--log-every", "1", "--save-every", str(every), "--cache-dir", tok["cache"],
               "--no-progress", "--no-tensorboard"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    rng = random.Random(17)
    moments = [f"step:{rng.randint(1, every - 1)}",       # before the first checkpoint
               f"save:{rng.randint(1, 2)}",                # during a save
               "slow:0.1"]                                 # after a random delay
    kills = []
    for moment in moments:
        # what a user does next: the same command, or --resume auto once a checkpoint exists
        resume = ["--resume", "auto"] if list_checkpoints(out) else []
        proc = subprocess.Popen([sys.executable, "-c", KILLER, moment, *command, *resume],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if moment.startswith("slow:"):
            # the child rewrites or appends metrics.jsonl once it trains: then a random delay
            metrics = out / "metrics.jsonl"
            seen = metrics.read_bytes() if metrics.exists() else b""
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline and \
                    (metrics.read_bytes() if metrics.exists() else b"") == seen:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            assert proc.poll() is None, "the run ended before the kill"
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        kills.append((moment, [c.name for c in list_checkpoints(out)],
                      sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))))
    resume = ["--resume", "auto"] if list_checkpoints(out) else []
    assert cli_main(command + resume) == 0
    assert kills[0][1] == []  # the first kill came before any checkpoint
    assert kills[1][2] != []  # the second one cut a save short
    assert figures(read_metrics(out)) == figures(reference.records)
    got, want = load_file(out / "final" / "model.safetensors"), \
        load_file(reference.final_dir / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("tensorboard", [True, False])
def test_copy_history_takes_the_records_up_to_the_step(tmp_path, tensorboard):
    from pldr.training.metrics import copy_history

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "tb").mkdir(parents=True)
    (src / "tb" / "events.out").write_bytes(b"events")
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (src / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "spl')  # cut by a kill
    before = snapshot(src)
    dst.mkdir()
    (dst / "metrics.jsonl").write_text("a leftover\n")
    copy_history(src, dst, 2, tensorboard)
    assert [r["step"] for r in read_metrics(dst)] == [1, 2]
    assert (dst / "tb" / "events.out").exists() == tensorboard
    assert snapshot(src) == before
