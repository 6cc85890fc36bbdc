"""The shared training step (training/step.py): activation checkpointing gives the plain
forward's losses and gradients, the fused AdamW takes the per-tensor loop's step, and the
benchmark's train measurement runs this code."""

from __future__ import annotations

import copy

import pytest
import torch

from fixture_utils import assert_same
from pldr import PLDRConfig, PLDRModel
from pldr.training.step import forward_backward, make_optimizer, update

SMALL = dict(num_layers=2, d_model=32, num_heads=2, dff=64, num_reslayerA=2, num_denseA=2,
             A_dff=16, max_seq_len=32, vocab_size=64)


def small_model(dtype: torch.dtype, **changes) -> PLDRModel:
    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.preset("tiny").replace(**{**SMALL, **changes})).to(dtype).train()


def batch(rows: int = 3, length: int = 17, pads: bool = True) -> torch.Tensor:
    ids = torch.randint(3, 64, (rows, length), generator=torch.Generator().manual_seed(1))
    if pads:
        ids[0, :5] = 0  # a left-padded row: a masked call, pads out of A and the loss
    return ids


CASES = [(dtype, "v510", dag) for dtype in (torch.float64, torch.float32)
         for dag in ((0.0, 0.0, 0.0), (0.01, 0.02, 0.03))] + [(torch.float64, "v510G", (0.0,) * 3)]


@pytest.mark.parametrize("dtype,variant,dag", CASES)
def test_activation_checkpointing_gives_the_same_losses_and_gradients(dtype, variant, dag):
    plain = small_model(dtype, variant=variant)
    ckpt = copy.deepcopy(plain)
    ckpt.set_activation_checkpointing(True)
    assert all(layer.checkpointed for layer in ckpt.decoder.dec_layers)
    ids = batch()
    lo_p, pred_p = forward_backward(plain, ids, pad_id=0, dag_coeffs=dag, ce_weight=0.7,
                                      dag_weight=0.5, with_deductive=True)
    lo_c, pred_c = forward_backward(ckpt, ids, pad_id=0, dag_coeffs=dag, ce_weight=0.7,
                                      dag_weight=0.5, with_deductive=True)
    assert_same(lo_c.loss.detach(), lo_p.loss.detach(), "loss")
    assert pred_c.shape == ids[:, 1:].shape and torch.equal(pred_c, pred_p)
    for key in lo_p.dag:
        assert_same(lo_c.dag[key].detach(), lo_p.dag[key].detach(), f"dag {key}")
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        assert_same(p.grad, grads[name].grad, name)
    # the plain layers kept their activations: more tensors were saved for backward
    assert not any(layer.checkpointed for layer in plain.decoder.dec_layers)


def _saved_bytes(model: PLDRModel, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1]).logits.sum()
    return total


def test_activation_checkpointing_keeps_less_for_backward():
    model = small_model(torch.float32, num_layers=3)
    ids = batch(pads=False)
    plain = _saved_bytes(model, ids)
    model.set_activation_checkpointing(True)
    checkpointed = _saved_bytes(model, ids)
    assert checkpointed < plain / 3, (checkpointed, plain)
    model.set_activation_checkpointing(False)
    assert _saved_bytes(model, ids) == plain


def test_checkpointing_runs_only_for_uncached_calls_with_gradients(monkeypatch):
    import pldr
    from pldr.model import model as model_module

    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    model = small_model(torch.float64)
    model.set_activation_checkpointing(True)
    prompt = batch(1, 6, pads=False)
    with torch.no_grad():
        model(prompt)
    pldr.generate(model.eval(), prompt, 4, temperature=0, eos_id=-1)  # cached calls
    assert calls == []
    model.train()(prompt).logits.sum().backward()
    assert len(calls) == model.config.num_layers


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_adamw_takes_the_per_tensor_loops_steps(dtype):
    """Three updates from the same gradients (so that float rounding cannot make the two
    runs' gradients drift apart, which Adam's division by sqrt(v) would amplify)."""
    model = small_model(dtype)
    ref = copy.deepcopy(model)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5,
                                weight_decay=0.1, foreach=False)
    refs = dict(ref.named_parameters())
    for step in range(3):
        lr = 1e-2 / (step + 1)
        forward_backward(model, batch(), pad_id=0)
        for name, p in model.named_parameters():
            refs[name].grad = p.grad.clone()
        update(model, opt, lr)
        torch.nn.utils.clip_grad_value_(ref.parameters(), 1.0)  # the original's update
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            assert p.grad is None
            assert_same(p.detach(), refs[name].detach(), f"step {step + 1}: {name}")


def test_bench_train_runs_the_shared_step(monkeypatch):
    """`pldr bench --what train` calls training/step.py (with checkpointing when asked)."""
    from pldr.bench.measure import BenchSpec, run_one
    from pldr.training import step

    calls = {"forward_backward": 0, "update": 0}
    for name in calls:
        real = getattr(step, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(step, name, counted)
    seen = []
    real_set = PLDRModel.set_activation_checkpointing
    monkeypatch.setattr(PLDRModel, "set_activation_checkpointing",
                        lambda self, on=True: (seen.append(on), real_set(self, on)))
    spec = BenchSpec(what="train", model="tiny", train_batch=1, train_len=8, repeats=2,
                     activation_checkpointing=True)
    result = run_one(spec)
    assert calls == {"forward_backward": 3, "update": 3}  # warm-up and two timed steps
    assert seen == [True] and result.tokens_per_s > 0
