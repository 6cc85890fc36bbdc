"""RoPE in both styles (PLDRConfig.rope_style): rotate-half is interleaved RoPE on permuted
dims, so a rotate-half (PLDR-LLM-v52 style) model equals its permuted interleaved twin."""

from __future__ import annotations

import torch

import pldr
from pldr import PLDRConfig, PLDRModel
from pldr.checkpoint.convert import permute_rope_style, rope_permutation
from pldr.model.attention import apply_rope, apply_rope_half, rope_tables
from fixture_utils import assert_same


def test_rotate_half_equals_interleaved_on_permuted_dims_float64():
    torch.manual_seed(0)
    dk, T = 16, 7
    cos, sin = rope_tables(dk, 32, 10000.0)
    pos = torch.arange(2, 2 + T)[None].expand(3, T)
    x = torch.randn(3, T, 2, dk, dtype=torch.float64)
    perm = rope_permutation(dk)
    assert perm.tolist()[:4] == [0, 8, 1, 9]
    half = apply_rope_half(x, cos[pos], sin[pos])
    assert half.dtype == torch.float64
    assert_same(apply_rope(x[..., perm], cos[pos], sin[pos]), half[..., perm], "permuted")
    # and it is the rotation of the complex numbers x[i] + i x[i + dk/2] by pos * theta_i
    h = dk // 2
    angle = pos[..., None].double() * (10000.0 ** (-torch.arange(0, dk, 2).double() / dk))
    z = torch.complex(x[..., :h], x[..., h:]) * torch.polar(torch.ones_like(angle), angle)[:, :, None]
    want = torch.cat((z.real, z.imag), dim=-1)
    assert (half - want).abs().max() < 1e-6  # the table is float32, as the original builds it


def _half_model() -> PLDRModel:
    torch.manual_seed(1)
    config = PLDRConfig(num_layers=2, d_model=64, num_heads=4, dff=96, num_reslayerA=2,
                        num_denseA=2, A_dff=24, vocab_size=120, max_seq_len=64,
                        rope_style="half")
    model = PLDRModel(config).double().eval()
    with torch.no_grad():  # non-zero biases, so every permuted tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("bias", "blst", "balst")):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _twin(model: PLDRModel) -> PLDRModel:
    state, config = permute_rope_style(model.state_dict(), model.config, "interleaved")
    twin = PLDRModel(config).double().eval()
    twin.load_state_dict(state)
    return twin


def test_rotate_half_model_equals_its_permuted_interleaved_twin_float64():
    model = _half_model()
    twin = _twin(model)
    assert twin.config.rope_style == "interleaved"
    ids = torch.randint(4, 120, (2, 20))
    a, b = model(ids, return_deductive=True), twin(ids, return_deductive=True)
    assert_same(b.logits, a.logits, "logits")
    perm = rope_permutation(model.config.dk)
    for name in ("A", "A_LM", "A_P", "G_LM"):
        got, want = getattr(b.deductive, name), getattr(a.deductive, name)
        assert_same(got, want[..., perm, :][..., perm], name)  # A_twin[i, j] = A[perm i, perm j]
    # the permutation back is exact
    back, config = permute_rope_style(twin.state_dict(), twin.config, "half")
    assert config == model.config
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_rotate_half_model_generates_like_its_twin():
    model = _half_model()
    twin = _twin(model)
    prompts = [[5, 9, 33, 7], [61, 2, 17]]
    for cache in ("kv_g", "no_cache"):
        assert (pldr.generate(model, prompts, 8, cache=cache, temperature=0, eos_id=-1)
                == pldr.generate(twin, prompts, 8, cache=cache, temperature=0, eos_id=-1))


def test_rope_style_differs_from_interleaved():
    model = _half_model()
    inter = PLDRModel(model.config.replace(rope_style="interleaved")).double().eval()
    inter.load_state_dict(model.state_dict())
    ids = torch.randint(4, 120, (1, 12))
    assert (model(ids).logits - inter(ids).logits).abs().max() > 1e-3
