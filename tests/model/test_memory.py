"""Memory estimates before allocation: parameters counted exactly, the inference cache as
it is allocated, and a configuration that passes SIZE_LIMITS but cannot fit refused in one
line (training before its run folder is written; an engine before its cache exists), while
large configurations that fit stay allowed."""

from __future__ import annotations

import json

import pytest
import torch

from pldr import Engine, PLDRConfig, PLDRModel
from pldr.cli import main as cli_main
from pldr.config import SIZE_LIMITS
from pldr.errors import ConfigError
from pldr.model.cache import InferenceCache
from pldr.model.memory import SKIP_ENV, MemoryEstimate, cache_memory, check_fits, training_memory
from pldr.model.model import parameter_count

TINY = PLDRConfig.preset("tiny").replace(vocab_size=300, max_seq_len=64)
# every size within SIZE_LIMITS, yet about 1e12 parameters: no machine holds it
N_TINY = parameter_count(TINY)
HUGE = PLDRConfig.preset("tiny").replace(d_model=65536, num_heads=512, dff=1 << 18,
                                         num_layers=64, vocab_size=400)


def test_huge_config_is_legal():
    for name, limit in SIZE_LIMITS.items():
        assert getattr(HUGE, name) <= limit


def test_parameter_count_is_exact():
    model = PLDRModel(TINY)
    assert parameter_count(TINY) == sum(t.numel() for t in (*model.parameters(),
                                                             *model.buffers()))


@pytest.mark.parametrize("kv", [True, False])
def test_cache_estimate_is_what_the_cache_allocates(kv):
    cache = InferenceCache(TINY, 3, 40, kv=kv, keep_G=True)
    t = cache.tensors
    tensors = [t.G_LM, t.A_LM, t.A_G, t.A_P]
    if kv:
        tensors += [t.k, t.v, t.A]
    got = sum(t.numel() * t.element_size() for t in tensors)
    assert cache_memory(TINY, 3, 40, kv, torch.float32).total == got


def test_training_estimate_grows_with_rows_and_splits_over_shards():
    one = training_memory(TINY, N_TINY, 2, 32)
    parts = dict(one.parts)
    assert parts["AdamW state"] == 2 * parts["parameters"] == 8 * parameter_count(TINY)
    assert training_memory(TINY, N_TINY, 4, 32).total > one.total
    sharded = dict(training_memory(TINY, N_TINY, 2, 32, shards=2).parts)
    assert sharded["parameters"] == parts["parameters"] // 2
    assert one.scaled(2).total == 2 * one.total


def test_check_fits_names_the_estimate_the_memory_and_the_knob(monkeypatch):
    need = MemoryEstimate((("parameters", 3 << 30), ("activations (rough)", 1 << 30)))
    cpu = torch.device("cpu")
    check_fits(need, cpu, "lower --x", "this", available=(need.total, "free"))  # fits: allowed
    with pytest.raises(ConfigError) as err:
        check_fits(need, cpu, "lower --x", "this", available=(need.total - 1, "free"))
    text = str(err.value)
    assert text.startswith("this needs about 4 GiB (parameters 3 GiB, activations (rough) "
                           "1 GiB) but cpu has 4 GiB free; lower --x")
    assert "\n" not in text and SKIP_ENV in text
    monkeypatch.setenv(SKIP_ENV, "1")
    check_fits(need, cpu, "lower --x", "this", available=(1, "free"))


def test_large_configs_that_fit_are_allowed():
    big = PLDRConfig.preset("pldr-110m")
    check_fits(training_memory(big, parameter_count(big), 1, 64), torch.device("cpu"), "-",
               "training")
    assert Engine(PLDRModel(TINY).eval(), max_batch=64).max_batch == 64


def test_an_engine_too_large_for_memory_is_refused_before_allocation():
    model = PLDRModel(TINY).eval()
    with pytest.raises(ConfigError, match=r"inference cache of 100000000 rows .*`max_batch`"):
        Engine(model, max_batch=100_000_000)


def test_train_refuses_a_config_that_cannot_fit_before_writing(tmp_path, capsys):
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    tok = tmp_path / "tok.model"
    Tokenizer.train(load_documents("builtin", "train[:5%]"), 400).save(tok)
    config = tmp_path / "huge.json"
    config.write_text(json.dumps(HUGE.to_dict()))
    out = tmp_path / "run"
    code = cli_main(["train", "--model", str(config), "--tokenizer", str(tok), "--out", str(out),
                     "--split", "train[:5%]", "--val-split", "none", "--context-length", "64",
                     "--no-progress", "--no-tensorboard", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: training this model needs about ")
    assert "GiB" in err and "AdamW state" in err and "--micro-batch-size" in err
    assert not out.exists()
