"""The SwiGLU unit's training path (`_SwiGLUFunction`, fewer saved tensors) gives the plain
expression's values and gradients, in float64 and float32, for 2-D and 4-D inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixture_utils import assert_same
from pldr.model.attention import GLU, _SwiGLUFunction


def plain(glu: GLU, x: torch.Tensor) -> torch.Tensor:
    return glu.gluw3(F.silu(glu.gluw1(x)) * glu.gluw2(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 5, 12)])
def test_training_path_equals_the_plain_expression(dtype, shape):
    torch.manual_seed(0)
    glu = GLU(12, 9, 6).to(dtype)
    for lin in (glu.gluw1, glu.gluw2, glu.gluw3):
        torch.nn.init.normal_(lin.bias)  # non-zero biases: their gradients count too
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    upstream = torch.randn(*shape[:-1], 6, dtype=dtype)
    params = [x, *glu.parameters()]
    got = glu(x)
    got_grads = torch.autograd.grad(got, params, upstream)
    want = plain(glu, x)
    want_grads = torch.autograd.grad(want, params, upstream)
    assert_same(got.detach(), want.detach(), "output")
    for name, a, b in zip(["x"] + [n for n, _ in glu.named_parameters()], got_grads, want_grads):
        assert_same(a, b, name)


def test_gradcheck_in_float64():
    torch.manual_seed(1)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True)
            for s in ((5, 4), (3, 4), (3,), (3, 4), (3,), (2, 3), (2,))]
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, args)


def test_the_training_path_keeps_fewer_tensors_for_backward():
    glu = GLU(16, 40, 16)
    x = torch.randn(64, 16, requires_grad=True)
    sizes = []
    for f in (glu, lambda t: plain(glu, t)):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            f(x)
        sizes.append(total)
    hidden = 64 * 40
    assert sizes[1] - sizes[0] >= 2 * hidden, sizes
