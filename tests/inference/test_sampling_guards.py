"""Sampling never receives an empty or non-finite distribution: bad temperatures, seeds and
eos ids are refused at the API edge, a tiny top_p keeps the best token, and NaN logits end
in one clear PLDRError rather than a traceback from torch.multinomial."""

import pytest
import torch

from pldr import PLDRConfig, PLDRError, PLDRModel
from pldr.inference import Engine, generate
from pldr.inference.sampling import (BAD_ROW, NonFiniteLogitsError, SamplingConfig,
                                     filter_logits, sample, sample_row)

TINY = PLDRConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PLDRModel(TINY).eval()


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -1.0, 1e-45, 1e-310, True, "1"])
def test_bad_temperature_is_refused(t):
    with pytest.raises(PLDRError, match="temperature"):
        SamplingConfig(temperature=t)


@pytest.mark.parametrize("p", [float("nan"), 0.0, -0.1, 1.5, float("inf")])
def test_bad_top_p_is_refused(p):
    with pytest.raises(PLDRError, match="top_p"):
        SamplingConfig(top_p=p)


@pytest.mark.parametrize("p", [1e-300, 1e-46, 1e-9])
def test_top_p_rounding_to_zero_keeps_the_best_token(p):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    kept = filter_logits(logits, SamplingConfig(top_p=p))
    assert torch.isfinite(kept).tolist() == [[False, True, False, False]]
    assert sample(logits, SamplingConfig(top_p=p)).tolist() == [1]


def test_tiny_temperature_is_finite_and_near_greedy():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    probs = filter_logits(logits, SamplingConfig(temperature=1e-30)).softmax(-1)
    assert torch.isfinite(probs).all()
    assert probs.argmax().item() == 1 and probs[0, 1].item() == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0),
                                      SamplingConfig(top_k=2, top_p=0.5)])
def test_non_finite_logits_mark_the_row_not_crash(bad, sampling):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [0.1, bad, 0.2, 0.3]])
    got = sample(logits, sampling, [torch.Generator().manual_seed(1)] * 2).tolist()
    assert got[1] == BAD_ROW and 0 <= got[0] < 4
    assert sample_row(logits[1], sampling, torch.Generator().manual_seed(1)).item() == BAD_ROW


@pytest.mark.parametrize("cache", ["kv_g", "kv_only", "g_only", "no_cache"])
def test_nan_weights_give_one_clear_error(cache):
    torch.manual_seed(0)
    bad = PLDRModel(TINY).eval()
    with torch.no_grad():
        bad.final_layer.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf logits"):
        generate(bad, [[5, 6, 7]], 3, cache=cache, seed=1)
    with pytest.raises(NonFiniteLogitsError):
        generate(bad, [[5, 6, 7]], 3, cache=cache, temperature=0)


@pytest.mark.parametrize("seed", ["abc", 2 ** 64, 2 ** 63, -1, 1.5, [1, "x"], [2 ** 70]])
def test_bad_seed_is_one_error(model, seed):
    with pytest.raises(PLDRError, match="seed"):
        generate(model, [[5, 6]], 2, seed=seed)


@pytest.mark.parametrize("seed", ["abc", 2 ** 64, -3])
def test_engine_refuses_bad_seed(model, seed):
    engine = Engine(model, max_batch=1, max_len=8)
    with pytest.raises(PLDRError, match="seed"):
        engine.submit([5, 6], 2, seed=seed)


@pytest.mark.parametrize("eos", [TINY.vocab_size, 99999, -2, 1.0, "3"])
def test_eos_outside_the_vocabulary_is_refused(model, eos):
    with pytest.raises(PLDRError, match="eos_id"):
        generate(model, [[5, 6]], 2, eos_id=eos)
    engine = Engine(model, max_batch=1, max_len=8)
    with pytest.raises(PLDRError, match="eos_id"):
        engine.submit([5, 6], 2, eos_id=eos)


def test_good_values_still_work(model):
    out = generate(model, [[5, 6]], 3, seed=2 ** 63 - 1, eos_id=-1, top_p=1e-300)
    greedy = generate(model, [[5, 6]], 3, temperature=0, eos_id=-1)
    assert out == greedy  # a nucleus of one token is greedy
    assert generate(model, [[5, 6]], 2, eos_id=TINY.vocab_size - 1, seed=0)
