import math

import pytest
import torch

from pldr import dag_values, loss_with_dag, masked_accuracy, masked_loss
from pldr.model.losses import dag_value
from fixture_utils import DAG_REL_TOL, FIXTURE_TOL, expected, fixture_model, inputs

# parity with the original's numbers: .ci/run also runs these under AVX2-only kernels
pytestmark = pytest.mark.parity


def _training_forward(name):
    exp = expected()
    ids = exp["selfgen/tokens"] if name == "selfgen" else inputs()[name]
    with torch.no_grad():
        out = fixture_model(metric_includes_pad=True)(ids[:, :-1], return_deductive=True)
    return out, ids[:, 1:], exp


@pytest.mark.parametrize("name", ["tokens", "tokens_padded", "selfgen"])
def test_loss_and_accuracy_match_the_original(name):
    out, targets, exp = _training_forward(name)
    assert abs(masked_loss(out.logits, targets).item() - exp[f"{name}/loss"].item()) < FIXTURE_TOL["loss"]
    assert abs(masked_accuracy(out.logits, targets).item() - exp[f"{name}/accuracy"].item()) < 1e-6


def test_selfgen_accuracy_is_non_zero():
    out, targets, _ = _training_forward("selfgen")
    assert masked_accuracy(out.logits, targets).item() == pytest.approx(15 / 23)


@pytest.mark.parametrize("name", ["tokens", "tokens_padded", "selfgen"])
def test_training_dag_values_match_the_original(name):
    out, _, exp = _training_forward(name)
    dag = dag_values(out.deductive)
    assert dag["A"].item() == pytest.approx(exp[f"{name}/train_dag_A"].item(),
                                            rel=DAG_REL_TOL["A"])
    assert dag["G"].item() == pytest.approx(exp[f"{name}/train_dag_G"].item(),
                                            rel=DAG_REL_TOL["G"])
    assert dag["A_P"].item() == pytest.approx(exp[f"{name}/train_dag_Ap"].item(),
                                            rel=DAG_REL_TOL["A_P"])


@pytest.mark.parametrize("name", ["tokens", "tokens_padded"])
def test_full_forward_dag_values_and_finite_where_the_original_overflows(name):
    with torch.no_grad():
        out = fixture_model(metric_includes_pad=True)(inputs()[name], return_deductive=True)
    exp = expected()
    dag = dag_values(out.deductive)
    assert dag["A"].item() == pytest.approx(exp[f"{name}/dag_A"].item(),
                                            rel=DAG_REL_TOL["A"])
    assert dag["G"].item() == pytest.approx(exp[f"{name}/dag_G"].item(),
                                            rel=DAG_REL_TOL["G"])
    want = exp[f"{name}/dag_Ap"].item()
    assert math.isfinite(dag["A_P"].item())
    if math.isinf(want):  # the original overflows float32 here; the exact value is 25.61207
        assert dag["A_P"].item() == pytest.approx(25.61207, rel=1e-4)
    else:
        assert dag["A_P"].item() == pytest.approx(want, rel=DAG_REL_TOL["A_P"])


def test_dag_value_equals_the_direct_formula_in_float64():
    torch.manual_seed(0)
    X = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    M = X * X
    direct = (torch.log(torch.linalg.matrix_exp(M).diagonal(dim1=-2, dim2=-1).sum(-1) / 6)).abs().mean()
    assert dag_value(X).item() == pytest.approx(direct.item(), rel=1e-10)
    # a zero row (reducible M) still gives a finite, exact value
    X[0, 0, 2] = 0
    M = X * X
    direct = (torch.log(torch.linalg.matrix_exp(M).diagonal(dim1=-2, dim2=-1).sum(-1) / 6)).abs().mean()
    assert dag_value(X).item() == pytest.approx(direct.item(), rel=1e-10)


def test_loss_with_dag_coefficients():
    out, targets, _ = _training_forward("tokens")
    zero = loss_with_dag(out.logits, targets, out.deductive, (0, 0, 0))
    assert torch.equal(zero.loss, zero.ce)
    assert set(zero.dag) == {"A", "A_P", "G"}  # logged even with zero coefficients
    some = loss_with_dag(out.logits, targets, out.deductive, (0.5, 0.0, 2.0))
    want = zero.ce + 0.5 * zero.dag["A"] + 2.0 * zero.dag["G"]
    assert some.loss.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="three numbers >= 0"):
        loss_with_dag(out.logits, targets, out.deductive, (-1, 0, 0))


def test_dag_term_has_a_gradient():
    model = fixture_model()
    ids = inputs()["tokens"]
    out = model(ids[:, :-1], return_deductive=True)
    res = loss_with_dag(out.logits, ids[:, 1:], out.deductive, (0, 0, 1.0))
    res.loss.backward()
    assert model.decoder.dec_layers[0].mha1.plgatt_layer.balst.grad.abs().sum() > 0


def test_no_real_target_gives_zero_not_nan():
    logits = torch.randn(1, 3, 10)
    targets = torch.zeros(1, 3, dtype=torch.long)
    assert masked_loss(logits, targets).item() == 0.0
    assert masked_accuracy(logits, targets).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_rows_equals_torch_cross_entropy_forward_and_backward(dtype):
    """The memory-lean cross-entropy gives F.cross_entropy's values and gradients."""
    import torch.nn.functional as F
    from fixture_utils import assert_same
    from pldr.model.losses import cross_entropy_rows

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 101, generator=gen, dtype=dtype) * 4).requires_grad_()
    targets = torch.randint(0, 101, (37,), generator=gen)
    targets[:3] = targets[3]  # repeated targets
    upstream = torch.randn(37, generator=gen, dtype=dtype)
    got = cross_entropy_rows(logits, targets)
    (got_grad,) = torch.autograd.grad(got, logits, upstream)
    want = F.cross_entropy(logits, targets, reduction="none")
    (want_grad,) = torch.autograd.grad(want, logits, upstream)
    assert_same(got.detach(), want.detach(), "ce")
    assert_same(got_grad, want_grad, "grad")
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(cross_entropy_rows, (logits[:5, :7].detach()
                                                             .requires_grad_(), targets[:5] % 7))


def test_masked_loss_gradient_equals_the_unfused_formula_in_float64():
    import torch.nn.functional as F
    from fixture_utils import assert_same

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=gen, dtype=torch.float64).requires_grad_()
    targets = torch.randint(1, 50, (2, 9), generator=gen)
    targets[0, :4] = 0
    (got,) = torch.autograd.grad(masked_loss(logits, targets), logits)
    keep = (targets != 0).double().flatten()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    (want,) = torch.autograd.grad((ce * keep).sum() / keep.sum(), logits)
    assert_same(got, want, "masked loss gradient")
