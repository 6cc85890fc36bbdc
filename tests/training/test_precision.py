"""--precision: bf16-mixed (bfloat16 autocast, float32 weights and AdamW state) tracks fp32's
loss over 20 steps of the tiny preset; bf16-true keeps bfloat16 weights and still learns;
the deductive outputs of a bf16-mixed forward are finite; old run settings with `dtype` read
as the same precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pldr import PLDRConfig, PLDRModel
from pldr.errors import ConfigError
from pldr.training import TrainConfig, train
from pldr.training.config import check_settings

# bf16-mixed against fp32, same data and seed: the per-step loss within 3% (bfloat16 keeps 8
# bits of mantissa, ~0.4% per rounding; the losses measured here differ by under 1%)
LOSS_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> dict:
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("precision")
    Tokenizer.train(load_documents("builtin", "train[:10%]"), 512).save(root / "tok.model")
    return {"tokenizer": str(root / "tok.model"), "cache": str(root / "cache")}


def run(tok: dict, out: Path, precision: str):
    cfg = TrainConfig(model="tiny", tokenizer=tok["tokenizer"], data="builtin",
                      split="train[:10%]", val_split="none", out=str(out), max_steps=20,
                      batch_size=4, context_length=32, lr=2e-3, warmup_steps=4, log_every=5,
                      precision=precision, cache_dir=tok["cache"], progress=False,
                      tensorboard=False)
    return train(cfg)


def test_bf16_mixed_tracks_fp32_for_20_steps(tok, tmp_path):
    fp32 = run(tok, tmp_path / "fp32", "fp32").train_losses
    mixed = run(tok, tmp_path / "mixed", "bf16-mixed")
    losses = mixed.train_losses
    assert sorted(losses) == [5, 10, 15, 20]  # each the mean loss of its 5 steps
    for step, loss in fp32.items():
        assert losses[step] == pytest.approx(loss, rel=LOSS_TOLERANCE), step
    assert losses[20] < losses[5] - 0.3  # it learns
    # float32 master weights: the final model is float32
    from pldr.checkpoint import load_model

    assert load_model(mixed.final_dir).dtype == torch.float32


def test_bf16_true_keeps_bfloat16_weights_and_learns(tok, tmp_path):
    result = run(tok, tmp_path / "true", "bf16-true")
    losses = result.train_losses
    assert losses[20] < losses[5] - 0.3
    from safetensors import safe_open

    with safe_open(str(result.final_dir / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() in ("BF16",) for k in f.keys()
                   if "G_LM" not in k)


def test_bf16_mixed_forward_gives_finite_deductive_outputs():
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.preset("tiny")).train()
    ids = torch.randint(1, model.config.vocab_size, (2, 48))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, return_deductive=True)
    d = out.deductive
    for name in ("A", "A_LM", "A_P", "G_LM"):
        t = getattr(d, name)
        assert t is not None and torch.isfinite(t).all(), name
    assert torch.isfinite(out.logits).all() and out.logits.dtype == torch.bfloat16


def test_precision_is_checked_and_old_dtype_settings_still_read():
    with pytest.raises(ConfigError, match="`precision` must be one of fp32, bf16-mixed"):
        TrainConfig(precision="fp16").check()
    assert check_settings({"dtype": "bfloat16"}, "x") == {"precision": "bf16-mixed"}
    assert check_settings({"dtype": "float32"}, "x") == {"precision": "fp32"}
    with pytest.raises(ConfigError, match="unknown training setting"):
        check_settings({"dtype": "float16"}, "x")


def test_compile_trains_the_same_steps_as_eager(tok, tmp_path):
    """--compile runs the forward and backward under torch.compile: the same losses as
    eager within float32 rounding of fused kernels."""
    small = dict(num_layers=1, d_model=32, num_heads=2, dff=64, num_reslayerA=1,
                 num_denseA=1, A_dff=16, max_seq_len=64)
    losses = {}
    for compiled in (False, True):
        cfg = TrainConfig(model=PLDRConfig.preset("tiny").replace(**small),
                          tokenizer=tok["tokenizer"], data="builtin", split="train[:10%]",
                          val_split="none", out=str(tmp_path / str(compiled)), max_steps=3,
                          batch_size=2, context_length=16, lr=1e-3, warmup_steps=0,
                          log_every=1, compile=compiled, cache_dir=tok["cache"],
                          progress=False, tensorboard=False)
        losses[compiled] = train(cfg).train_losses
    assert sorted(losses[True]) == [1, 2, 3]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, rel=1e-4), step


def test_the_02_dtype_flag_of_pldr_train_still_means_its_precision(monkeypatch):
    """`pldr train --dtype bfloat16` (0.2) runs as --precision bf16-mixed; --precision wins."""
    import pldr.training.trainer as trainer
    from pldr.cli import main

    seen = []

    def fake_train(cfg, **kw):
        seen.append(cfg.precision)
        raise SystemExit(0)

    monkeypatch.setattr(trainer, "train", fake_train)
    for argv, want in ((["--dtype", "bfloat16"], "bf16-mixed"), (["--dtype", "float32"], "fp32"),
                       (["--dtype", "bfloat16", "--precision", "fp32"], "fp32")):
        with pytest.raises(SystemExit):
            main(["train", "--model", "tiny", "--data", "builtin", *argv])
    assert seen == ["bf16-mixed", "fp32", "fp32"]
