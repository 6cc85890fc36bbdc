"""Training: schedule, loss falls, exact resume (max-steps, Ctrl-C, kill -9), DAG terms, NaN
stop, bad input. Tiny models on slices of the built-in corpus keep every test fast on 2 CPU
cores."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pldr import CheckpointError, PLDRConfig
from pldr.errors import install_extra_command
from pldr.checkpoint import load_model
from pldr.cli import main as cli_main
from pldr.training import TrainConfig, TrainingError, train
from pldr.training.checkpointing import list_checkpoints
from pldr.training.metrics import read_metrics
from pldr.training.schedule import lr_at

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_layers=1, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
             A_dff=16, max_seq_len=64)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """A 512-piece tokenizer trained on a slice of the built-in corpus, a token cache and a
    small model config file, shared by the module's tests."""
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("train_shared")
    tok = root / "tok.model"
    Tokenizer.train(load_documents("builtin", "train[:20%]"), 512).save(tok)
    model_json = root / "model.json"
    PLDRConfig.preset("tiny").replace(**SMALL).to_json(model_json)
    return {"tokenizer": str(tok), "cache": str(root / "cache"), "model_json": str(model_json)}


def small_cfg(shared: dict, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(model=PLDRConfig.preset("tiny").replace(**SMALL),
                       tokenizer=shared["tokenizer"], out=str(out), data="builtin",
                       split="train[:30%]", val_split="none", max_steps=12, batch_size=4,
                       context_length=32, lr=1e-3, warmup_steps=3, log_every=1,
                       cache_dir=shared["cache"], progress=False, tensorboard=False)
    return base.replace(**changes)


def quiet_train(cfg: TrainConfig, **kwargs):
    """`train` as a library call: it prints nothing (it logs to the "pldr" logger)."""
    return train(cfg, **kwargs)


def losses(run: Path, key: str = "loss", split: str = "train") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run, split)}


def assert_same_losses(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=rel, abs=0), step


# ----- learning rate ------------------------------------------------------------------------


def reference_lr(step, lr, warmup, total, alpha):
    """The schedule as the original defines it, written independently of pldr.train.lr_at."""
    if step < warmup:
        return lr * step / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return lr * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)))


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 30, 55, 99, 100, 150])
def test_lr_schedule_matches_formula(step):
    got = lr_at(step, 2e-3, 10, 100, 0.1)
    assert got == pytest.approx(reference_lr(step, 2e-3, 10, 100, 0.1), rel=1e-12, abs=1e-15)


def test_lr_schedule_landmarks():
    assert lr_at(0, 1.0, 10, 100, 0.1) == 0.0
    assert lr_at(5, 1.0, 10, 100, 0.1) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)      # peak after warm-up
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)     # half way: mean of ends
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)     # alpha * lr at the end
    assert lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)     # held after
    assert lr_at(1, 1.0, 0, 100, 0.1) == pytest.approx(reference_lr(1, 1.0, 0, 100, 0.1))


# ----- a run -----------------------------------------------------------------------------


def test_loss_falls_and_run_folder_is_complete(shared, tmp_path):
    out = tmp_path / "run"
    cfg = small_cfg(shared, out, max_steps=40, lr=3e-3, warmup_steps=5, save_every=10,
                    keep_checkpoints=2, val_split="train[95%:]", eval_every=20,
                    tensorboard=True)
    result = quiet_train(cfg)
    curve = [r["loss"] for r in result.records if r["split"] == "train"]
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.7, curve

    # metrics: the original's figures, the learning rate of the schedule, DAG values always
    train_recs = read_metrics(out, "train")
    val_recs = read_metrics(out, "val")
    assert [r["step"] for r in val_recs] == [20, 40]
    for r in train_recs:
        for key in ("loss", "accuracy", "lr", "tokens", "tokens_per_s", "dag_A", "dag_Ap",
                    "dag_G", "global_loss", "global_accuracy", "epoch_loss", "epoch",
                    "step_loss"):
            assert r[key] is not None, key
        assert r["lr"] == pytest.approx(reference_lr(r["step"], 3e-3, 5, 40, 0.1))
        assert r["tokens"] == r["step"] * 4 * 32
    for r in val_recs:
        assert all(r[k] is not None for k in ("loss", "accuracy", "dag_A", "dag_Ap", "dag_G"))
    assert train_recs[-1]["global_loss"] == pytest.approx(sum(curve) / 40)
    assert list((out / "tb").glob("events.out.tfevents.*"))

    # checkpoints: the last two kept, no temporary folders; final is a model folder
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["step-00000030", "step-00000040"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt = out / "checkpoints" / "step-00000040"
    names = {p.name for p in ckpt.iterdir()}
    # one resumable format, DCP, also on one process; safetensors only in model directories
    assert {".metadata", "__0_0.distcp", "trainer_state.json", "config.json",
            "tokenizer.model"} == names
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 1
    assert {p.name for p in result.final_dir.iterdir()} == {"config.json", "model.safetensors",
                                                             "tokenizer.model", "manifest.json"}
    model = load_model(result.final_dir)
    assert model.config.vocab_size == 512
    ids = torch.randint(1, 512, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_grad_accum_equals_larger_batch(shared, tmp_path):
    """2 micro-batches of 4 rows give the step of one batch of 8 (the same rows, in pack mode),
    so the loss scaling of accumulation is right."""
    a = quiet_train(small_cfg(shared, tmp_path / "a", batch_size=8, max_steps=4))
    b = quiet_train(small_cfg(shared, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=4))
    assert_same_losses(a.train_losses, b.train_losses, rel=1e-5)


# ----- exact resume ------------------------------------------------------------------------


def test_resume_after_max_steps_logs_same_losses(shared, tmp_path):
    quiet_train(small_cfg(shared, tmp_path / "full", max_steps=12, val_split="train[95%:]",
                                 eval_every=4))
    part = tmp_path / "part"
    first = quiet_train(small_cfg(shared, part, max_steps=6, lr_total_steps=12,
                                  val_split="train[95%:]", eval_every=4))
    assert first.step == 6 and first.final_dir is not None
    second = quiet_train(small_cfg(shared, part, max_steps=12, lr_total_steps=12, resume="auto",
                                   val_split="train[95%:]", eval_every=4))
    assert second.step == 12
    assert min(second.train_losses) == 7  # it continued, not restarted
    for key in ("loss", "accuracy", "global_loss", "epoch_loss", "dag_G"):
        assert_same_losses(losses(tmp_path / "full", key), losses(part, key), rel=1e-6)
    # validation at steps 4, 8, 12 (and at the end of the first part, step 6)
    val_full, val_part = losses(tmp_path / "full", split="val"), losses(part, split="val")
    assert {s: val_part[s] for s in val_full} == pytest.approx(val_full, rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(shared, tmp_path):
    full = quiet_train(small_cfg(shared, tmp_path / "full"))
    out = tmp_path / "run"

    def press_ctrl_c(step, values):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = quiet_train(small_cfg(shared, out), on_step=press_ctrl_c)
    assert stopped.interrupted and stopped.step == 5 and stopped.final_dir is None
    assert [p.name for p in list_checkpoints(out)] == ["step-00000005"]
    assert not (out / "final").exists()
    resumed = quiet_train(small_cfg(shared, out, resume="auto"))
    assert resumed.step == 12
    assert_same_losses(full.train_losses, losses(out), rel=1e-6)


def test_keyboard_interrupt_mid_step_resumes_exactly(shared, tmp_path):
    """A KeyboardInterrupt raised inside a step (second Ctrl-C) saves the state after the last
    finished step, and the resumed run repeats the cut step."""
    full = quiet_train(small_cfg(shared, tmp_path / "full"))
    out = tmp_path / "run"
    calls = {"n": 0}
    import pldr.training.step as step_module  # the training step's loss (trainer and bench)

    original = step_module.loss_with_dag

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_module, "loss_with_dag", flaky)
        stopped = quiet_train(small_cfg(shared, out))
    assert stopped.interrupted and stopped.step == 7
    quiet_train(small_cfg(shared, out, resume="auto"))
    assert_same_losses(full.train_losses, losses(out), rel=1e-6)


def test_epochs_and_resume_across_an_epoch_boundary(shared, tmp_path):
    small = dict(split="train[:2%]", max_steps=None, epochs=2)
    full = quiet_train(small_cfg(shared, tmp_path / "full", **small))
    per_epoch = full.total_steps // 2
    assert full.step == full.total_steps == 2 * per_epoch and per_epoch >= 3
    recs = read_metrics(tmp_path / "full", "train")
    assert [r["epoch"] for r in recs] == [0] * per_epoch + [1] * per_epoch
    first_of_second = recs[per_epoch]
    assert first_of_second["epoch_loss"] == pytest.approx(first_of_second["loss"])
    assert recs[-1]["epoch_loss"] == pytest.approx(
        sum(r["loss"] for r in recs[per_epoch:]) / per_epoch)

    out = tmp_path / "part"
    quiet_train(small_cfg(shared, out, split="train[:2%]", max_steps=per_epoch + 2,
                          lr_total_steps=2 * per_epoch))
    quiet_train(small_cfg(shared, out, resume="auto", lr_total_steps=2 * per_epoch, **small))
    for key in ("loss", "epoch_loss", "global_loss", "epoch"):
        assert_same_losses(losses(tmp_path / "full", key), losses(out, key), rel=1e-6)


def _cli_env(shared: dict) -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PLDR_CACHE_DIR=shared["cache"], PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_train_args(shared: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", shared["model_json"], "--tokenizer", shared["tokenizer"],
            "--out", str(out), "--split", "train[:30%]", "--val-split", "none",
            "--batch-size", "4", "--context-length", "32", "--lr", "1e-3",
            "--warmup-steps", "3", "--lr-total-steps", "100000", "--log-every", "1",
            "--no-progress", "--no-tensorboard", *extra]


def test_kill_9_then_resume_from_last_complete_checkpoint(shared, tmp_path):
    out = tmp_path / "run"
    args = _cli_train_args(shared, out, "--max-steps", "100000", "--save-every", "3",
                           "--keep-checkpoints", "2")
    proc = subprocess.Popen([sys.executable, "-m", "pldr", *args], env=_cli_env(shared),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while len(list_checkpoints(out)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # what a kill can leave behind must never be resumed: a temporary folder, a folder
    # without its trainer state
    (out / "checkpoints" / ".tmp-step-99999999").mkdir(exist_ok=True)
    (out / "checkpoints" / "step-99999998").mkdir()
    last = list_checkpoints(out)[-1]
    k = int(last.name.split("-")[1])
    assert k >= 6 and k % 3 == 0
    json.loads((last / "trainer_state.json").read_text())  # complete, parseable

    until = k + 4
    rc = cli_main(_cli_train_args(shared, out, "--resume", "auto", "--max-steps", str(until)))
    assert rc == 0
    assert not (out / "checkpoints" / ".tmp-step-99999999").exists()  # cleaned up
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, until + 1))  # records after k were dropped
    reference = quiet_train(small_cfg(shared, tmp_path / "ref", max_steps=until,
                                      lr_total_steps=100000))
    assert_same_losses(reference.train_losses, resumed, rel=1e-6)
    # the same arithmetic from the DCP checkpoint on: the final weights agree bit for bit
    got, want = load_model(out / "final").state_dict(), load_model(reference.final_dir).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_damaged_checkpoint_is_a_one_line_error(shared, tmp_path, capsys):
    out = tmp_path / "run"
    quiet_train(small_cfg(shared, out, max_steps=1))
    shard = list_checkpoints(out)[-1] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    rc = cli_main(_cli_train_args(shared, out, "--resume", "auto", "--max-steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "truncated or altered" in err, err  # the manifest names it first
    assert len(err.strip().splitlines()) == 1


# ----- DAG terms -----------------------------------------------------------------------------


def test_dag_coefficients_enter_the_loss(shared, tmp_path):
    quiet_train(small_cfg(shared, tmp_path / "plain", max_steps=3))
    coeffs = (0.01, 0.002, 0.05)
    quiet_train(small_cfg(shared, tmp_path / "dag", max_steps=3, dag_coeffs=coeffs))
    p, d = read_metrics(tmp_path / "plain", "train"), read_metrics(tmp_path / "dag", "train")
    for r in p:  # DAG values are logged with zero coefficients too; the loss is the CE
        assert all(r[k] is not None and r[k] >= 0 for k in ("dag_A", "dag_Ap", "dag_G"))
        assert r["loss"] == pytest.approx(r["ce"], rel=1e-12)
    for r in d:  # loss = ce + cA*dag(A_LM) + cAp*dag(A_P) + cG*dag(G_LM)
        expected = r["ce"] + sum(c * r[k] for c, k in zip(coeffs, ("dag_A", "dag_Ap", "dag_G")))
        assert r["loss"] == pytest.approx(expected, rel=1e-9)
        assert r["loss"] > r["ce"]
    # same weights and batch at step 1; the DAG gradient changes the later steps
    assert d[0]["ce"] == pytest.approx(p[0]["ce"], rel=1e-6)
    assert d[0]["dag_G"] == pytest.approx(p[0]["dag_G"], rel=1e-6)
    assert abs(d[2]["ce"] - p[2]["ce"]) > 1e-6


def test_dag_values_are_logged_at_every_report(shared, tmp_path):
    """Without DAG terms the values are computed on reported steps only; they equal the values
    of a run that reports every step."""
    quiet_train(small_cfg(shared, tmp_path / "every", max_steps=6))
    quiet_train(small_cfg(shared, tmp_path / "sparse", max_steps=6, log_every=3))
    e, s = read_metrics(tmp_path / "every", "train"), read_metrics(tmp_path / "sparse", "train")
    assert [r["step"] for r in s] == [3, 6]
    for r in s:
        ref = e[r["step"] - 1]
        for key in ("dag_A", "dag_Ap", "dag_G", "step_loss"):
            assert r[key] == pytest.approx(ref[key], rel=1e-6), key
        assert r["loss"] == pytest.approx(sum(x["loss"] for x in e[r["step"] - 3:r["step"]]) / 3)


def test_nan_loss_stops_with_error_and_keeps_last_checkpoint(shared, tmp_path, monkeypatch,
                                                            capsys):
    import pldr.training.step as step_module  # the training step's loss (trainer and bench)

    original = step_module.loss_with_dag
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] == 5:
            out.ce = out.ce * float("nan")
            out.loss = out.ce
        return out

    monkeypatch.setattr(step_module, "loss_with_dag", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="nan at step 5"):
        quiet_train(small_cfg(shared, out, save_every=2))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert not (out / "final").exists()
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert max(r["step"] for r in read_metrics(out)) == 4

    # through the CLI: exit status 2 and one `error:` line
    calls["n"] = 0
    rc = cli_main(_cli_train_args(shared, tmp_path / "cli", "--max-steps", "8"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "nan" in err and "Traceback" not in err


# ----- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("case,extra,message", [
    ("missing data", ["--data", "/no/such/corpus.txt"], "does not exist"),
    ("unknown preset", ["--model", "pldr-9000b"], "neither a preset"),
    ("batch size 0", ["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ("context too long", ["--context-length", "65"], "longer than the model's max_seq_len 64"),
    ("nothing to resume", ["--resume", "auto"], "no complete checkpoint"),
    ("resume not a checkpoint", ["--resume", "/no/such/ckpt"], "not a training checkpoint"),
    ("bad dag coeffs", ["--dag-coeffs", "1,2"], "three comma-separated numbers"),
    ("missing tokenizer", ["--tokenizer", "/no/such/tok.model"], "does not exist"),
])
def test_bad_input_errors_before_any_work(shared, tmp_path, capsys, case, extra, message):
    out = tmp_path / "run"
    args = _cli_train_args(shared, out, "--max-steps", "2")
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += extra[i:i + 2]
    started = time.perf_counter()
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert time.perf_counter() - started < 5


def test_batch_not_divisible_by_world_size(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it; checked before any start
    out = tmp_path / "run"
    rc = cli_main(_cli_train_args(shared, out, "--max-steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "divisible by the number of processes, 3" in err
    assert not out.exists()


def test_existing_run_needs_resume(shared, tmp_path, capsys):
    out = tmp_path / "run"
    quiet_train(small_cfg(shared, out, max_steps=1))
    before = sorted(p.name for p in out.rglob("*"))
    rc = cli_main(_cli_train_args(shared, out, "--max-steps", "2"))
    assert rc == 2 and "--resume auto" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_cli_resume_reuses_the_runs_settings(shared, tmp_path):
    """`pldr train --resume auto --out RUN --max-steps N` continues a run without restating
    its flags (they come from the checkpoint)."""
    out = tmp_path / "run"
    assert cli_main(_cli_train_args(shared, out, "--max-steps", "3")) == 0
    assert cli_main(["train", "--resume", "auto", "--out", str(out), "--max-steps", "5",
                     "--no-progress"]) == 0
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["batch_size"] == 4 and cfg["context_length"] == 32


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_a_flag_that_overrides_it(shared, tmp_path, capsys, suffix):
    """`pldr train --config FILE` takes TrainConfig's field names; a flag given as well wins.
    The run's checkpoint is a DCP folder: `pldr generate` on it says how to convert it, and
    the converted folder generates."""
    out = tmp_path / "run"
    settings = {"model": shared["model_json"], "tokenizer": shared["tokenizer"],
                "out": str(out), "split": "train[:30%]", "val_split": "none", "batch_size": 4,
                "context_length": 32, "max_steps": 5, "warmup_steps": 2, "log_every": 1,
                "lr": "2e-3", "dag_coeffs": [0.0, 0.0, 0.01], "progress": False,
                "tensorboard": False}
    file = tmp_path / f"train{suffix}"
    if suffix == ".yaml":  # YAML reads 1e-3 as a string; the float field takes it anyway
        file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    else:
        file.write_text(json.dumps(settings))
    assert cli_main(["train", "--config", str(file), "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train step 2/2" in printed  # the library's log lines, printed by the CLI
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 2                                   # the flag
    assert saved["lr"] == 2e-3 and saved["dag_coeffs"] == [0.0, 0.0, 0.01]  # the file
    assert sorted(losses(out)) == [1, 2]

    ckpt = list_checkpoints(out)[-1]
    assert cli_main(["generate", "--model", str(ckpt), "--ids", "5,6", "--max-new-tokens",
                     "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pldr convert --dcp {ckpt}" in err[0]
    with pytest.raises(CheckpointError, match="resumable training checkpoint"):
        load_model(ckpt)
    assert cli_main(["convert", "--dcp", str(ckpt), "--out", str(tmp_path / "model")]) == 0
    assert cli_main(["generate", "--model", str(tmp_path / "model"), "--ids", "5,6",
                     "--max-new-tokens", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.split("\n", 1)[1])[0]["ids"]) == 2


def test_config_file_errors_are_one_line(shared, tmp_path, capsys):
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"max_step": 3}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: [1, 2\n")
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"data": 5}))
    for file, message in ((bad_key, "unknown training setting(s) max_step"),
                          (broken, "is not valid YAML"),
                          (wrong_type, "data in the settings file --config"),
                          (tmp_path / "none.json", "does not exist")):
        rc = cli_main(["train", "--config", str(file), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_extras_are_one_line_errors_and_defaults_do_without_them(shared, tmp_path,
                                                                        capsys, monkeypatch):
    """datasets, TensorBoard and YAML are extras: without them a run on a text source trains
    (no OUT/tb), and asking for them says which extra to install."""
    for extra in ("tensorboard", "yaml", "datasets"):
        monkeypatch.setitem(sys.modules, extra, None)  # as if not installed
    result = quiet_train(small_cfg(shared, tmp_path / "run", max_steps=1, tensorboard=None))
    assert result.step == 1 and not (tmp_path / "run" / "tb").exists()
    rc = cli_main(_cli_train_args(shared, tmp_path / "tb", "--max-steps", "1", "--tensorboard"))
    err = capsys.readouterr().err
    assert rc == 2 and install_extra_command("tensorboard") in err and len(err.splitlines()) == 1
    (tmp_path / "c.yaml").write_text("max_steps: 1\n")
    rc = cli_main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and install_extra_command("yaml") in err and len(err.splitlines()) == 1
    (tmp_path / "docs.jsonl").write_text('{"text": "a document"}\n')
    rc = cli_main(_cli_train_args(shared, tmp_path / "j", "--max-steps", "1", "--data",
                                  str(tmp_path / "docs.jsonl")))
    err = capsys.readouterr().err
    assert rc == 2 and install_extra_command("data") in err and len(err.splitlines()) == 1
    assert not any((tmp_path / d).exists() for d in ("tb", "y", "j"))


# ----- demo ----------------------------------------------------------------------------------


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from pldr.cli.demo_job import run_demo

    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "cache"))
    result = run_demo(tmp_path / "demo", steps=2, progress=False, max_new_tokens=4)
    printed = capsys.readouterr().out
    assert "samples" in printed and "G_LM spread" in printed
    assert len(result.samples) == 4 and len(result.g_spread) == 2
    assert all(v >= 0 for v in result.g_spread)
    assert (tmp_path / "demo" / "final" / "tokenizer.model").is_file()
    assert load_model(tmp_path / "demo" / "final").config.vocab_size == 2048


def test_a_trained_tokenizer_does_not_make_the_run_read_the_data_twice(tmp_path, monkeypatch):
    from pldr.data import SourcePart

    reads = []
    original = SourcePart.units

    def counting(self):
        reads.append((self.start, self.stop))
        return original(self)

    monkeypatch.setattr(SourcePart, "units", counting)
    train(TrainConfig(model=PLDRConfig.preset("tiny").replace(num_layers=1, d_model=32,
                                                               num_heads=2, dff=64, A_dff=16,
                                                               max_seq_len=64),
                      data="builtin", out=str(tmp_path / "run"), vocab_size=400, max_steps=1,
                      batch_size=4, context_length=32, progress=False, tensorboard=False,
                      cache_dir=str(tmp_path / "cache")))
    # builtin is one part: read once for train[:90%] (tokenizer and tokens), once for train[90%:]
    assert reads == [(0, None), (0, None)]


# ----- defaults that keep a newcomer's run sound --------------------------------------------


def test_a_warmup_longer_than_the_run_is_capped_so_the_peak_lr_is_reached(shared, tmp_path,
                                                                          caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="pldr"):
        result = quiet_train(small_cfg(shared, out, max_steps=4, warmup_steps=100, lr=1e-3))
    lrs = [r["lr"] for r in result.records if r["split"] == "train"]
    assert max(lrs) == pytest.approx(1e-3, rel=1e-12)  # the peak --lr, reached
    said = [r.getMessage() for r in caplog.records if "`warmup_steps`" in r.getMessage()]
    assert len(said) == 1 and "100" in said[0], said
    capped = json.loads((out / "train_config.json").read_text())["warmup_steps"]
    assert 1 <= capped < 4  # recorded, so a resumed run keeps the same schedule


def test_checkpoints_are_saved_at_an_interval_by_default_and_help_says_what_it_is(capsys):
    assert TrainConfig().save_every > 0  # an interrupted long run keeps its work
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {TrainConfig().save_every})" in help_text
    assert "0: only at the end" in help_text
    assert "capped" in help_text  # what --warmup-steps does when longer than the run
