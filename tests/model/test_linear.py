"""`Linear`: the turned-round float32 product for a few rows equals F.linear, and is taken only
where it is measured faster."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixture_utils import assert_same
from pldr.config import PLDRConfig
from pldr.model import linear as linear_mod
from pldr.model.cache import InferenceCache
from pldr.model.linear import SMALL_BATCH_ROWS, Linear, linear
from pldr.model.model import PLDRModel


@pytest.fixture
def turned(monkeypatch):
    """Take the turned-round product wherever the rows allow, whatever this CPU is."""
    monkeypatch.setattr(linear_mod, "WEIGHT_LEFT_PAYS", True)


@pytest.mark.parametrize("shape", [(16, 1, 24), (2, 16, 24), (48, 24), (6, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_turned_round_equal_f_linear(turned, shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g) if bias else None
    y = linear(x, w, b)
    assert y.shape == (*shape[:-1], 40)
    assert not y.is_contiguous()  # the transposed view: this path was taken
    assert_same(y, F.linear(x, w, b))


@pytest.mark.parametrize("shape,dtype", [((5, 24), torch.float32), ((49, 24), torch.float32),
                                         ((1, 1, 24), torch.float32), ((16, 24), torch.float64),
                                         ((16, 24), torch.bfloat16)])
def test_other_rows_and_dtypes_are_f_linear(turned, shape, dtype):
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in (shape, (40, 24), (40,)))
    y = linear(x, w, b)
    assert y.is_contiguous()
    assert torch.equal(y, F.linear(x, w, b))


def test_gradients_equal_f_linear(turned):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 24, generator=g, dtype=torch.float64).float().requires_grad_()
    layer = Linear(24, 40)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    F.linear(x, layer.weight, layer.bias).square().sum().backward()
    for got, t in zip(grads, (x, layer.weight, layer.bias)):
        assert_same(got, t.grad)


def test_gate_follows_the_kernels(monkeypatch):
    """Intel with AVX-512 kernels turns the product round; AVX2 ones (ATen's or MKL's), other
    vendors and builds without MKL do not."""
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    for vendor, capability, mkl, expected in (
            ("GenuineIntel", "AVX512", None, True), ("GenuineIntel", "AVX512", "AVX512", True),
            ("GenuineIntel", "AVX512", "AVX2", False), ("GenuineIntel", "AVX2", None, False),
            ("GenuineIntel", "DEFAULT", None, False), ("AuthenticAMD", "AVX512", None, False)):
        monkeypatch.setattr(linear_mod, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        if mkl is None:
            monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
        else:
            monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", mkl)
        assert linear_mod.weight_left_pays() is expected, (vendor, capability, mkl)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setattr(linear_mod, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert linear_mod.weight_left_pays() is False


def test_model_layers_stay_nn_linear_and_decode_agrees(monkeypatch):
    """The model's layers are nn.Linear to every caller (state dict, quantize swaps), and a
    cached step of 8 rows gives the same logits (contiguous) either way."""
    cfg = PLDRConfig.preset("tiny")
    torch.manual_seed(0)
    model = PLDRModel(cfg).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Linear) for m in linears)
    ids = torch.randint(3, cfg.vocab_size, (8, 5), generator=torch.Generator().manual_seed(3))
    step = torch.randint(3, cfg.vocab_size, (8, 1), generator=torch.Generator().manual_seed(4))
    logits, head_contiguous = {}, {}
    model.final_layer.register_forward_hook(
        lambda mod, args, out: head_contiguous.__setitem__(turn, out.is_contiguous()))
    for turn in (False, True):
        monkeypatch.setattr(linear_mod, "WEIGHT_LEFT_PAYS", turn)
        with torch.inference_mode():
            cache = InferenceCache.for_mode(cfg, "kv_g", 8, 8, model.device, model.dtype)
            model(ids, cache=cache)
            logits[turn] = model(step, cache=cache).logits
    assert head_contiguous == {False: True, True: False}  # turned round only when asked
    assert logits[True].is_contiguous() and 8 in SMALL_BATCH_ROWS
    assert_same(logits[True], logits[False])
