"""The numbers of pldr.analysis on cases whose answers are known: identical inputs, a fixed
G_LM (v510G), the identity, and cached against uncached deductive outputs in float64."""

import pytest
import torch

from pldr import PLDRConfig, PLDRModel
from pldr.analysis import (RunningMoments, build_report, cached_deductive, collect,
                           invariance, spectra, uncached_deductive)
from pldr.analysis.collect import CACHED_MODES, KINDS, max_abs_diff
from pldr.analysis.report import between_inputs, det_of
from pldr.errors import PLDRError
from fixture_utils import assert_same

CONFIG = PLDRConfig(num_layers=2, d_model=32, num_heads=2, dff=48, num_reslayerA=1,
                    num_denseA=2, A_dff=24, vocab_size=300, max_seq_len=40)
INPUTS = [[17, 5, 99, 42, 7], [255, 84, 58, 257, 132, 129, 26], [9, 12, 280, 6]]


def model(dtype=torch.float64, variant="v510", G_LM=None, seed=0):
    torch.manual_seed(seed)
    return PLDRModel(CONFIG.replace(variant=variant), G_LM=G_LM).to(dtype).eval()


def test_identical_inputs_give_rmse_zero():
    items = collect(model(), [INPUTS[0]] * 3)
    report = build_report(items, [0, 1])
    for layer in report["layers"]:
        assert layer["G_LM_rmse"] == 0  # pairwise differences of equal tensors: exactly 0
        assert all(v == 0 for row in layer["pairwise_rmse"] for v in row)
        assert layer["G_LM_rmse_to_mean"] <= 1e-15  # the mean rounds: (x + x + x) / 3
        assert layer["G_LM_rms"] > 0  # the G_LM itself is not zero


def test_different_inputs_give_rmse_above_zero_and_pairs_match_a_direct_computation():
    items = collect(model(), INPUTS)
    G = torch.stack([it.G_LM for it in items])                      # [N, L, H, dk, dk]
    inv = invariance(G)
    direct = (G[0, 1, 1] - G[2, 1, 1]).pow(2).mean().sqrt()
    assert float(inv.pairwise[0, 2, 1, 1]) == pytest.approx(float(direct), rel=1e-12)
    # between the inputs: the root mean square over the 3 pairs
    pairs = [inv.pairwise[i, j, 0, 1] for i, j in ((0, 1), (0, 2), (1, 2))]
    want = torch.stack(pairs).pow(2).mean().sqrt()
    assert float(between_inputs(inv.pairwise)[0, 1]) == pytest.approx(float(want), rel=1e-12)
    report = build_report(items, [0, 1])
    assert all(L["G_LM_rmse"] > 1e-6 for L in report["layers"])


def test_a_v510G_model_gives_rmse_zero_and_its_own_buffer():
    torch.manual_seed(1)
    G = torch.randn(CONFIG.num_layers, CONFIG.num_heads, CONFIG.dk, CONFIG.dk)
    g_model = model(variant="v510G", G_LM=G)
    items = collect(g_model, INPUTS)
    for it in items:
        assert it.A is None and it.A_LM is None and it.A_P is None
        assert_same(it.G_LM, G.double())
        buffers = torch.stack([layer.mha1.G_LM for layer in g_model.decoder.dec_layers])
        assert torch.equal(it.G_LM, buffers)
    report = build_report(items, [0, 1])
    assert all(L["G_LM_rmse"] == 0 and L["G_LM_rmse_to_mean"] <= 1e-15 for L in report["layers"])
    assert report["kinds"] == ["G_LM"]


def test_identity_G_LM_has_det_one_and_singular_values_one():
    eye = torch.eye(16, dtype=torch.float64).expand(2, 3, 16, 16)
    s = spectra(eye)
    assert torch.equal(s.sign, torch.ones(2, 3, dtype=torch.float64))
    assert s.logabsdet.abs().max() < 1e-12
    assert (s.singular - 1).abs().max() < 1e-12
    assert torch.allclose(s.top_share, torch.full((2, 3), 1 / 16, dtype=torch.float64))
    # and through the whole report, for a v510G model with identity G_LM (the default)
    report = build_report(collect(model(variant="v510G"), INPUTS[:2]), [0, 1])
    for layer in report["layers"]:
        for head in layer["heads"]:
            assert all(d == pytest.approx(1.0, abs=1e-12) for d in head["det"])
            assert all(abs(v - 1) < 1e-12 for sv in head["singular_values"] for v in sv)


def test_det_of_a_known_matrix_and_of_an_overflowing_one():
    M = torch.tensor([[2.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    s = spectra(M)
    assert det_of(float(s.sign), float(s.logabsdet)) == pytest.approx(-6.0, rel=1e-12)
    assert det_of(1.0, 800.0) is None and det_of(0.0, float("-inf")) == 0.0


@pytest.mark.parametrize("mode", CACHED_MODES)
def test_cached_and_uncached_deductive_outputs_agree_in_float64(mode):
    m = model()
    for ids in INPUTS:
        full = uncached_deductive(m, ids)
        cached = cached_deductive(m, ids, mode)
        for kind in KINDS:
            a, b = getattr(cached, kind), getattr(full, kind)
            assert a is not None and b is not None, kind
            assert (a - b).abs().max() <= 1e-12, (mode, kind)
        assert float(max_abs_diff(cached, full).max()) <= 1e-12


def test_the_cache_check_can_fail():
    # the deductive outputs of another prompt differ: the comparison is not vacuous
    m = model()
    assert float(max_abs_diff(cached_deductive(m, INPUTS[1]), uncached_deductive(m, INPUTS[0])).max()) > 1e-4


def test_cache_diff_in_the_report_is_float64_small():
    report = build_report(collect(model(), INPUTS), [0, 1])
    assert all(L["cache_max_diff"] <= 1e-12 for L in report["layers"])


def test_running_moments_equal_the_direct_mean_and_std():
    torch.manual_seed(0)
    x = torch.randn(23, 3, 4, dtype=torch.float64) * 5 + 2
    m = RunningMoments()
    for part in x.split([1, 7, 4, 11]):
        m.add(part)
    assert m.count == 23
    assert_same(m.mean, x.mean(dim=0))
    assert_same(m.std, x.std(dim=0, unbiased=False))


def test_bad_inputs_are_clear_errors():
    m = model()
    with pytest.raises(PLDRError, match="outside the vocabulary"):
        collect(m, [[5, 6, 999]])
    with pytest.raises(PLDRError, match="at most 39"):
        collect(m, [list(range(5, 45))])
    with pytest.raises(PLDRError, match="pad id"):
        collect(m, [[5, 0, 6]])
