import math

import pytest
import torch

from pldr import PLDRConfig, PLDRError, PLDRModel, infer_G_LM, to_v510G
from pldr.model.attention import apply_rope, rope_tables
from fixture_utils import (assert_matches_fixture, assert_same, expected, fixture_model,
                           fixture_v510G_model, inputs)

# parity with the original's numbers: .ci/run also runs these under AVX2-only kernels
pytestmark = pytest.mark.parity

DEDUCTIVE = ("A", "A_LM", "A_P", "G_LM")


@pytest.mark.parametrize("name", ["tokens", "tokens_padded"])
def test_full_forward_matches_the_original(name):
    # metric_includes_pad=True reproduces the original's A over pad positions too
    model = fixture_model(metric_includes_pad=True)
    with torch.no_grad():
        out = model(inputs()[name], return_deductive=True)
    exp = expected()
    assert_matches_fixture(out.logits, exp[f"{name}/logits"], "logits")
    assert_matches_fixture(out.hidden, exp[f"{name}/dec_output"], "hidden")
    for field in DEDUCTIVE:
        assert_matches_fixture(getattr(out.deductive, field), exp[f"{name}/{field}"], field)


@pytest.mark.parametrize("name", ["tokens", "tokens_padded"])
def test_v510G_identity_twin_matches_the_original(name):
    model = fixture_v510G_model()
    with torch.no_grad():
        out = model(inputs()[name], return_deductive=True)
    exp = expected("v510G_identity_expected.pt")
    assert_matches_fixture(out.logits, exp[f"{name}/logits"], "logits")
    assert_matches_fixture(out.hidden, exp[f"{name}/dec_output"], "hidden")
    assert out.deductive.A is None and out.deductive.A_LM is None
    assert torch.equal(out.deductive.G_LM[:, 0], exp["G_LM"][:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_rows_equal_the_unpadded_row(dtype):
    model = fixture_model().to(dtype)  # default: pads never enter the metric tensor
    row = inputs()["tokens"][0, :16]
    pads = torch.zeros(8, dtype=torch.long)
    batch = torch.stack([torch.cat([row, pads]), torch.cat([pads, row])])  # right, left padded
    with torch.no_grad():
        alone = model(row[None], return_deductive=True)
        padded = model(batch, return_deductive=True)
    real = [slice(0, 16), slice(8, 24)]
    for b in range(2):
        assert_same(padded.logits[b, real[b]], alone.logits[0], what=f"row {b} logits")
        assert_same(padded.hidden[b, real[b]], alone.hidden[0], what=f"row {b} hidden")
        for field in DEDUCTIVE:
            assert_same(getattr(padded.deductive, field)[:, b],
                        getattr(alone.deductive, field)[:, 0], what=field)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metric_includes_pad_reproduces_the_original_dependence_on_pads(dtype):
    row = inputs()["tokens"][:1, :16]
    padded = torch.cat([row, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ours = fixture_model().to(dtype)(padded).logits[0, :16]
        orig = fixture_model(metric_includes_pad=True).to(dtype)(padded).logits[0, :16]
        alone = fixture_model().to(dtype)(row).logits[0]
    assert_same(ours, alone, what="pads kept out of A")
    assert (orig - alone).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metric_tensor_sums_over_the_whole_input(dtype):
    # A is q^T q over every position, so the logits at T-2 depend on the last token
    ids = inputs()["tokens"][:1].clone()
    model = fixture_model().to(dtype)
    with torch.no_grad():
        a = model(ids).logits
        ids[0, -1] = (ids[0, -1] + 1) % 299 + 1
        b = model(ids).logits
    assert (a[0, -2] - b[0, -2]).abs().max() > 1e-3
    assert_same(a[0, 0], b[0, 0], what="position 0 sees only itself")


def test_rope_is_interleaved_pairs():
    dk, T = 8, 5
    cos, sin = rope_tables(dk, 16, 10000.0)
    x = torch.randn(1, T, 2, dk)
    pos = torch.arange(3, 3 + T)[None]
    got = apply_rope(x, cos[pos], sin[pos])
    # the same rotation as complex multiplication of (x[2i] + i x[2i+1]) by e^{i p theta_i}
    theta = 10000.0 ** (-torch.arange(0, dk, 2).float() / dk)
    angle = pos[0, :, None].float() * theta                        # [T, dk/2]
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[None, :, None])
    assert torch.allclose(got, want.flatten(-2), atol=1e-5)


def test_initialisation_covers_wv_and_power_law_parameters():
    torch.manual_seed(0)
    cfg = PLDRConfig.preset("tiny")
    model = PLDRModel(cfg)
    D, H, dk = cfg.d_model, cfg.num_heads, cfg.dk
    wv = model.decoder.dec_layers[0].mha1.wv.weight
    xavier_bound = math.sqrt(6 / (2 * D))
    assert wv.abs().max() <= xavier_bound and wv.abs().max() > 0.9 * xavier_bound
    assert model.decoder.dec_layers[0].mha1.wv.bias.abs().max() == 0
    pw = model.decoder.dec_layers[0].mha1.plgatt_layer.pwlst
    assert abs(pw.std().item() - math.sqrt(2 / (dk * dk + H * dk))) < 0.01
    assert model.decoder.dec_layers[0].mha1.plgatt_layer.blst.abs().max() == 0
    assert abs(model.decoder.embedding.weight.std().item() - 1.0) < 0.05


def test_meta_device_build_then_materialise():
    cfg = PLDRConfig.preset("tiny")
    with torch.device("meta"):
        model = PLDRModel(cfg)
    assert model.final_layer.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    ref_cos, _ = rope_tables(cfg.dk, cfg.max_seq_len, cfg.rope_base)
    assert torch.equal(model.rope_tables("cpu")[0], ref_cos)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = model(torch.randint(1, cfg.vocab_size, (2, 8)))
    assert torch.isfinite(out.logits).all()


def test_110m_presets_have_the_papers_parameter_counts():
    for name, count in (("pldr-110m", 109_689_362), ("pldr-110m-G", 105_606_482)):
        with torch.device("meta"):
            model = PLDRModel(PLDRConfig.preset(name))
        assert model.num_parameters() == count


def test_v510G_keeps_its_G_LM_as_a_buffer():
    cfg = PLDRConfig.preset("tiny").replace(variant="v510G")
    G = torch.rand(cfg.num_layers, cfg.num_heads, cfg.dk, cfg.dk)
    model = PLDRModel(cfg, G_LM=list(G[:, None]))
    assert "decoder.dec_layers.1.mha1.G_LM" in model.state_dict()
    assert torch.equal(model.decoder.dec_layers[1].mha1.G_LM, G[1])
    model.to(torch.float64)
    assert model.decoder.dec_layers[1].mha1.G_LM.dtype == torch.float64
    with pytest.raises(PLDRError, match=r"\[4, 32, 32\]"):
        PLDRModel(cfg, G_LM=torch.rand(cfg.num_layers, 3, 32, 32))
    with pytest.raises(PLDRError, match="only for variant v510G"):
        PLDRModel(PLDRConfig.preset("tiny"), G_LM=G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_v510Gi_shares_weights_and_reproduces_the_v510_model(dtype):
    model = fixture_model().to(dtype)
    ids = inputs()["tokens"][:1]
    G = infer_G_LM(model, ids)
    assert len(G) == 2 and G[0].shape == (1, 4, 16, 16)
    g_model = to_v510G(model, G)
    assert g_model.config.variant == "v510G"
    assert g_model.final_layer.weight.data_ptr() == model.final_layer.weight.data_ptr()
    with torch.no_grad():
        assert_same(g_model(ids).logits, model(ids).logits, what="v510Gi logits")


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    (torch.tensor([[1, 300]]), ValueError, "token id 300 is outside the vocabulary"),
    (torch.tensor([[-1, 2]]), ValueError, "token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
    (torch.tensor([1, 2]), ValueError, r"ids\[None\]"),
    (torch.ones(1, 257, dtype=torch.long), ValueError, "max_seq_len is 256"),
    ([[1, 2]], TypeError, "LongTensor"),
])
def test_bad_ids_are_clear_errors(ids, error, message):
    with pytest.raises(error, match=message):
        fixture_model()(ids)


def test_rope_stays_float32_when_the_model_is_cast():
    model = fixture_model().to(torch.bfloat16)
    cos, sin = model.rope_tables("cpu")
    want_cos, want_sin = rope_tables(16, 256, 10000.0)
    assert cos.dtype == torch.float32 and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert "rope" not in " ".join(model.state_dict())


def test_bfloat16_forward_is_close_to_float32():
    model = fixture_model()
    ids = inputs()["tokens"]
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs()
    assert err.mean() < 0.05 and err.max() < 0.5  # logits reach 2.2; bf16 keeps ~3 digits
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_to_keep_gives_the_last_positions_only(dtype):
    model = fixture_model().to(dtype)
    ids = inputs()["tokens"]
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=3)
    assert last.logits.shape == (2, 3, 300) and last.hidden.shape == full.hidden.shape
    assert_same(last.logits, full.logits[:, -3:], what="last 3 logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_right_padding_with_attention_mask_equals_the_row_alone(dtype):
    model = fixture_model().to(dtype)
    row = inputs()["tokens"][0, :16]
    filler = torch.full((8,), 77)  # any ids: the mask, not the pad id, says what is real
    batch = torch.stack([torch.cat([row, filler]), torch.cat([row[:12], filler, row[:4]])])
    mask = torch.zeros(2, 24, dtype=torch.long)
    mask[0, :16] = 1
    mask[1, :12] = 1
    with torch.no_grad():
        alone = model(row[None], return_deductive=True)
        short = model(row[None, :12], return_deductive=True)
        padded = model(batch, attention_mask=mask, return_deductive=True)
    assert_same(padded.logits[0, :16], alone.logits[0], what="row 0 logits")
    assert_same(padded.logits[1, :12], short.logits[0], what="row 1 logits")
    for field in DEDUCTIVE:
        assert_same(getattr(padded.deductive, field)[:, 0], getattr(alone.deductive, field)[:, 0],
                    what=field)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explicit_positions_are_used(dtype):
    model = fixture_model().to(dtype)
    ids = inputs()["tokens"][:1, :10]
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        derived = model(left).logits[:, 3:]
        given = model(left, positions=torch.tensor([[0, 0, 0, *range(10)]])).logits[:, 3:]
        shifted = model(ids, positions=torch.arange(5, 15)[None]).logits
    assert_same(derived, plain, what="positions derived from the pad id")
    assert_same(given, plain, what="the same positions given")
    # RoPE makes attention depend on relative positions only; A (q^T q) does not: shifted
    # positions change the logits
    assert (shifted - plain).abs().max() > 1e-6


def test_a_pad_id_other_than_0_is_the_pad():
    model = fixture_model(pad_id=1).double()
    row = inputs()["tokens"][:1, :12]
    row = torch.where(row == 1, 2, row)
    with torch.no_grad():
        alone = model(row).logits
        padded = model(torch.cat([torch.ones(1, 4, dtype=torch.long), row], dim=1)).logits
    assert_same(padded[:, 4:], alone, what="left pads of id 1")


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_mask=torch.ones(1, 3)), r"attention_mask must be a tensor of the shape"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.long)), r"positions must be a tensor"),
    (dict(positions=torch.zeros(1, 4)), "positions must be integers"),
])
def test_bad_mask_or_positions_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fixture_model()(torch.tensor([[5, 6, 7, 8]]), **kwargs)
