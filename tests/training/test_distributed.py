"""Multi-process training on CPU: 2 ranks under torchrun (gloo, FSDP2) against 1 process with
the same global batch, resume through the one checkpoint format (DCP) across world sizes
(2 -> 2, 2 -> 1, 1 -> 2, and 1 -> 2 -> 1 exactly), and conversion of a checkpoint to a model
directory."""

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
from pldr.checkpoint import load_model
from pldr.cli import main as cli_main
from pldr.errors import CheckpointError
from pldr.training import TrainConfig, train
from pldr.training.checkpointing import dcp_to_pretrained, list_checkpoints
from pldr.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_layers=2, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
             A_dff=16, max_seq_len=64)
# Short documents in `pad` mode, so rows hold different numbers of real tokens and the two
# ranks' halves of a batch have different token counts (the loss scaling must handle that).
# lr 1e-4: the power-law step amplifies float rounding through AdamW at larger rates (the
# v510G twin does not), so a batch summed in another order drifts past 1e-4 after a few steps.
FLAGS = dict(chunk_mode="pad", batch_size=4, context_length=32, lr=1e-4, warmup_steps=2,
             log_every=1, save_every=3, keep_checkpoints=0, max_steps=6, eval_every=3,
             eval_batches=2)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 2-rank torchrun run (checkpoints at steps 3 and 6) and two 1-process runs of the same
    settings: `accum` takes each global batch as 2 micro-batches of 2 rows (the rows each rank
    takes), `plain` as one batch of 4 rows."""
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("dist")
    lines = [line.strip() for doc in load_documents("builtin", "train[:30%]")
             for line in doc.splitlines() if 20 < len(line.strip()) < 300]
    data = root / "short_docs.txt"
    data.write_text("\n\n".join(lines[:1500]), encoding="utf-8")
    tok = root / "tok.model"
    Tokenizer.train(lines[:1500], 512).save(tok)
    model_json = root / "model.json"
    PLDRConfig.preset("tiny").replace(**SMALL).to_json(model_json)
    shared = {"root": root, "data": str(data), "tokenizer": str(tok),
              "model_json": str(model_json), "cache": str(root / "cache")}
    shared["two"] = root / "two"
    run_torchrun(shared, shared["two"])
    shared["accum"] = root / "accum"
    one_process(shared, shared["accum"], batch_size=2, grad_accum=2, batch_agg_count=2,
                eval_batches=4)  # validation on the same 8 rows, 2 per forward
    shared["plain"] = root / "plain"
    one_process(shared, shared["plain"])
    return shared


def run_torchrun(shared: dict, out: Path, *extra: str) -> None:
    args = ["train", "--model", shared["model_json"], "--tokenizer", shared["tokenizer"],
            "--data", shared["data"], "--out", str(out), "--no-progress", "--no-tensorboard"]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PLDR_CACHE_DIR=shared["cache"])
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "pldr", *args, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def one_process(shared: dict, out: Path, **changes):
    """The run in this process, with one thread as each torchrun worker has."""
    cfg = TrainConfig(model=shared["model_json"], tokenizer=shared["tokenizer"],
                      data=shared["data"], out=str(out), cache_dir=shared["cache"],
                      progress=False, tensorboard=False, **{**FLAGS, **changes})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


def by_step(run: Path, split: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run, split)}


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def test_rank_halves_hold_different_token_counts(runs):
    """Guard of the test data: the loss scaling is only tested if the counts differ."""
    from pldr.data import build_loaders
    from pldr.data.tokenizer import Tokenizer

    loader, _ = build_loaders(runs["data"], Tokenizer.load(runs["tokenizer"]), 32, 4,
                              mode="pad", cache_dir=runs["cache"], progress=False)
    halves = [((b[:2, 1:] != 0).sum().item(), (b[2:, 1:] != 0).sum().item())
              for b, _ in zip(loader, range(6))]
    assert any(a != b for a, b in halves), halves


def test_two_ranks_equal_one_process_on_the_same_rows(runs):
    """2 ranks x 2 rows == 1 process x 2 micro-batches of the same 2 rows: the same sums in the
    same order, so equal to rounding (in practice bit for bit)."""
    for split, key in (("train", "loss"), ("train", "accuracy"), ("train", "dag_G"),
                       ("train", "global_loss"), ("val", "loss"), ("val", "accuracy")):
        two, one = by_step(runs["two"], split, key), by_step(runs["accum"], split, key)
        assert two.keys() == one.keys() and two
        assert two == pytest.approx(one, rel=1e-6, abs=1e-9), (split, key)
    state = json.loads((ckpt(runs["two"], 6) / "trainer_state.json").read_text())
    assert state["version"] == 2 and state["world_size"] == 2
    names = {p.name for p in ckpt(runs["two"], 6).iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "tokenizer.model",
            "trainer_state.json"} == names  # no per-rank RNG files: nothing draws after init
    # the final model gathered from the shards
    a, b = load_model(runs["two"] / "final"), load_model(runs["accum"] / "final")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=k)


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    """Against one batch of 4 rows the float sums differ in order; every logged loss still
    agrees within 1e-4 relative."""
    two, one = by_step(runs["two"]), by_step(runs["plain"])
    assert two.keys() == one.keys() and len(two) == FLAGS["max_steps"]
    assert two == pytest.approx(one, rel=1e-4)
    val_two, val_one = by_step(runs["two"], "val"), by_step(runs["plain"], "val")
    assert val_two.keys() == val_one.keys() and val_two == pytest.approx(val_one, rel=1e-4)


def test_activation_checkpointing_under_fsdp_gives_the_same_run(runs, tmp_path):
    """Each sharded layer recomputed in backward: the same losses, DAG values and weights."""
    ac = tmp_path / "ac"
    run_torchrun(runs, ac, "--activation-checkpointing", "--max-steps", "3",
                 "--eval-every", "0", "--save-every", "0")
    for key in ("loss", "dag_G"):
        got, want = by_step(ac, key=key), by_step(runs["two"], key=key)
        assert sorted(got) == [1, 2, 3]
        assert got == pytest.approx({s: want[s] for s in got}, rel=1e-6, abs=1e-9), key
    saved = json.loads((ac / "train_config.json").read_text())
    assert saved["activation_checkpointing"] is True


def test_dcp_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    resumed = tmp_path / "resumed"
    run_torchrun(runs, resumed, "--resume", str(ckpt(runs["two"], 3)))
    first = by_step(runs["two"])
    again = by_step(resumed)
    assert sorted(again) == [4, 5, 6]
    assert again == pytest.approx({s: first[s] for s in again}, rel=1e-6)
    for split, key in (("train", "global_loss"), ("val", "loss")):
        again = by_step(resumed, split, key)
        assert again and again == pytest.approx({s: by_step(runs["two"], split, key)[s]
                                                 for s in again}, rel=1e-6)


def test_dcp_checkpoint_loads_in_one_process(runs, tmp_path):
    """Model and optimizer state read from the 2-rank checkpoint equal the 1-process state
    at the same step (both DCP); a 1-process run resumes from it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from pldr.training.distributed import load_sharded
    from pldr.training.prepare import build_model

    def read(checkpoint: Path):
        config = PLDRConfig.from_json(checkpoint / "config.json")
        model = build_model(config, torch.device("cpu"), seed=123)
        optimizer = torch.optim.AdamW(model.parameters())
        load_sharded(model, optimizer, checkpoint)
        return model, get_optimizer_state_dict(model, optimizer)

    model, got = read(ckpt(runs["two"], 3))
    one, want = read(ckpt(runs["accum"], 3))
    weights = one.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=1e-6, atol=1e-8, msg=k)
    assert got["state"].keys() == want["state"].keys()
    for name, st in want["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["state"][name][key], value, rtol=1e-6, atol=1e-9,
                                       msg=f"{name}.{key}")

    result = one_process(runs, tmp_path / "one", resume=str(ckpt(runs["two"], 3)))
    assert sorted(result.train_losses) == [4, 5, 6]
    # step 4 is a forward from the checkpoint's weights: equal up to float rounding
    assert result.train_losses[4] == pytest.approx(by_step(runs["two"])[4], rel=1e-5)


def test_one_process_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    resumed = tmp_path / "resumed"
    run_torchrun(runs, resumed, "--resume", str(ckpt(runs["plain"], 3)))
    again = by_step(resumed)
    assert sorted(again) == [4, 5, 6]
    assert again[4] == pytest.approx(by_step(runs["plain"])[4], rel=1e-5)
    assert list_checkpoints(resumed)[-1].name == "step-00000006"


def test_dcp_checkpoint_converts_to_a_model_directory(runs, tmp_path, capsys):
    ckpt6 = ckpt(runs["two"], 6)
    converted = dcp_to_pretrained(ckpt6, tmp_path / "model")
    model = load_model(converted)
    final = load_model(runs["two"] / "final")
    for (k, x), y in zip(model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(x, y), k
    assert (converted / "tokenizer.model").is_file()

    rc = cli_main(["convert", "--dcp", str(ckpt6), "--out", str(tmp_path / "cli")])
    assert rc == 0, capsys.readouterr().err
    assert load_model(tmp_path / "cli").config.num_layers == 2
    rc = cli_main(["convert", "--dcp", str(ckpt6), "--out", str(tmp_path / "bf16"),
                   "--dtype", "bfloat16"])
    assert rc == 0 and "bfloat16" in capsys.readouterr().out
    assert load_model(tmp_path / "bf16").dtype == torch.bfloat16

    with pytest.raises(CheckpointError, match="not a Distributed Checkpoint"):
        dcp_to_pretrained(tmp_path / "model", tmp_path / "nope")
    assert cli_main(["convert", "--dcp", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_resume_across_world_sizes_1_2_1_is_exact(runs, tmp_path):
    """One process (steps 1-3), two ranks (4-6), one process (7-9), each resuming the other's
    DCP checkpoint, log the losses and end with the weights of one uninterrupted process. With
    --micro-batch-size 2 each forward takes the same 2 rows on 1 process or 2, so the sums are
    the same in the same order: equal bit for bit, not just close."""
    same = dict(micro_batch_size=2, max_steps=9, lr_total_steps=9)
    reference = one_process(runs, tmp_path / "ref", **same)
    chain = tmp_path / "chain"
    run_torchrun(runs, chain, "--resume", str(ckpt(tmp_path / "ref", 3)), "--max-steps", "6",
                 "--micro-batch-size", "2", "--lr-total-steps", "9")
    state = json.loads((ckpt(chain, 6) / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    one_process(runs, chain, resume="auto", **same)
    want = by_step(tmp_path / "ref")
    got = by_step(chain)
    assert sorted(got) == list(range(4, 10))
    assert got == {s: want[s] for s in got}  # exact
    for key in ("global_loss", "accuracy", "dag_G"):
        assert by_step(chain, key=key) == {s: by_step(tmp_path / "ref", key=key)[s]
                                           for s in got}, key
    a, b = load_model(chain / "final").state_dict(), load_model(reference.final_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# A torchrun worker: `pldr train` (argv[1:]) whose rank 1 dies by SIGKILL right after step 4,
# writing the time of death to $KILL_STAMP first; nothing of training changes.
KILL_RANK_1 = """
import os, signal, sys, time
import pldr.training.trainer as trainer
from pldr.cli import main

step_of = trainer.Trainer._train_step

def train_step(self, micro):
    out = step_of(self, micro)
    if os.environ["RANK"] == "1" and self.step == 4:
        with open(os.environ["KILL_STAMP"], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return out

trainer.Trainer._train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_killed_mid_run_ends_the_job_then_resume_auto_reproduces(runs, tmp_path):
    """SIGKILL of rank 1 in the middle of a 2-rank run: the job ends within seconds (torchrun
    stops rank 0; a rank 0 that sees the lost peer first says so in one line), and the same
    command with --resume auto continues from the last checkpoint to the losses of the run
    that was never interrupted."""
    import time

    out = tmp_path / "run"
    script, stamp = tmp_path / "kill_rank_1.py", tmp_path / "killed_at"
    script.write_text(KILL_RANK_1)
    args = ["train", "--model", runs["model_json"], "--tokenizer", runs["tokenizer"],
            "--data", runs["data"], "--out", str(out), "--no-progress", "--no-tensorboard",
            "--dist-timeout", "30"]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PLDR_CACHE_DIR=runs["cache"], KILL_STAMP=str(stamp))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # a monitor interval of 5 s mostly lets rank 0 meet the dead peer itself (gloo reports it
    # after about 4 s) before torchrun stops it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "--monitor-interval=5", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    ended = time.time()
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and stamp.exists(), log[-3000:]
    assert ended - float(stamp.read_text()) < 60, "the job hung after a rank died"
    assert "exitcode  : -9" in log and "SIGKILL" in log  # torchrun names the dead rank
    assert "this is a bug in pldr" not in log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [] or (len(errors) == 1 and "another process of this run" in errors[0]
                            and "--resume auto" in errors[0]), errors
    assert [c.name for c in list_checkpoints(out)] == ["step-00000003"]

    run_torchrun(runs, out, "--resume", "auto")
    for split, key in (("train", "loss"), ("train", "global_loss"), ("val", "loss")):
        got, want = by_step(out, split, key), by_step(runs["two"], split, key)
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6), (split, key)


def test_peer_failures_are_told_from_bugs():
    from pldr.training.distributed import peer_failure

    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read "
                        "error [127.0.0.1]:53446: Connection reset by peer. This is typically "
                        "caused by a remote worker hanging")
    assert peer_failure(gloo) == "Read error [127.0.0.1]:53446: Connection reset by peer"
    assert peer_failure(RuntimeError("ProcessGroupGloo timed out after 30s")) is not None
    assert peer_failure(RuntimeError("shape mismatch")) is None
    assert peer_failure(ValueError("Connection reset by peer")) is None
