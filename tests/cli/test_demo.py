"""Ctrl-C during `pldr demo` saves a checkpoint and says how to go on; running the same demo
again continues from that checkpoint instead of starting over."""

from __future__ import annotations

import json
import os
import signal

from pldr.cli import main
from pldr.training.checkpointing import checkpoint_step, list_checkpoints


def test_an_interrupted_demo_continues_when_run_again(tmp_path, capsys, monkeypatch):
    import pldr.cli.demo_job as demo_job

    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "cache"))
    real_config, real_train = demo_job.demo_config, demo_job.train

    def small_demo(*args, **kwargs):  # the demo's run, smaller: seconds instead of minutes
        return real_config(*args, **kwargs).replace(vocab_size=400, batch_size=4,
                                                    context_length=32, eval_every=0,
                                                    eval_batches=1)
    monkeypatch.setattr(demo_job, "demo_config", small_demo)

    def ctrl_c_at_step_3(cfg, **kwargs):
        def on_step(step, values):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return real_train(cfg, on_step=on_step, **kwargs)

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "8", "--no-progress"]
    monkeypatch.setattr(demo_job, "train", ctrl_c_at_step_3)
    assert main(argv) == 130
    printed = capsys.readouterr()
    said = printed.out + printed.err
    assert f"rerun `pldr demo --out {out} --steps 8` to continue from it" in said, said
    assert "--resume" not in said
    assert [checkpoint_step(c) for c in list_checkpoints(out)] == [3]
    assert not (out / "final").exists()
    # other settings are another demo: that one would start over
    assert demo_job.interrupted_demo(out, demo_job.demo_config(out, steps=9)) is None
    assert demo_job.interrupted_demo(out, demo_job.demo_config(out, steps=8)) is not None

    monkeypatch.setattr(demo_job, "train", real_train)
    assert main(argv) == 0  # the same command, as the message says
    said = capsys.readouterr().out
    assert "continuing the interrupted demo" in said and "at step 3" in said
    assert (out / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, 9))  # 1-3 before the interrupt, 4-8 after: none twice
