"""Host-device syncs of decoding, counted on the CPU (tests/sync_count.py): reading the
sampled tokens is the one sync of a step in `generate`, `stream` and the engine, with
log-probabilities asked for or not (they come back in the same copy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pldr
from pldr.inference.engine import Engine
from pldr.inference.generate import stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sync_count import SyncCounter  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10]]  # different lengths: the re-run modes left-pad


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    small = dict(num_layers=2, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
                 A_dff=16, max_seq_len=64)
    return pldr.PLDRModel(pldr.PLDRConfig.preset("tiny").replace(**small)).eval()


def test_the_counter_sees_host_reads():
    x = torch.randn(5)
    readers = (torch.Tensor.tolist, torch.Tensor.numpy)
    with SyncCounter() as syncs:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        x.numpy()
        torch.equal(x, x)
        x[x > 0]
        torch.nonzero(x)
        y = (x * 2 + 1).softmax(-1)  # no read
    assert syncs.count == 7, syncs.describe()
    assert y.shape == (5,)
    assert (torch.Tensor.tolist, torch.Tensor.numpy) == readers  # undone on exit


@pytest.mark.parametrize("cache", ["kv_g", "kv_only", "g_only", "no_cache"])
@pytest.mark.parametrize("greedy", [True, False])
def test_stream_and_generate_sync_once_per_step(model, cache, greedy):
    sampling = dict(temperature=0.0) if greedy else dict(temperature=0.9, top_p=0.9, seed=3)
    steps = 0
    with SyncCounter(label=lambda: steps) as syncs:
        for _ in stream(model, PROMPTS, 6, cache=cache, eos_id=-1, **sampling):
            steps += 1
    assert steps == 6
    assert all(syncs.by_label().get(s, 0) == 1 for s in range(steps)), syncs.describe()
    with SyncCounter() as syncs:
        out = pldr.generate(model, PROMPTS, 6, cache=cache, eos_id=-1, **sampling)
    assert [len(o) for o in out] == [6, 6] and syncs.count == 6, syncs.describe()


@pytest.mark.parametrize("logprobs", [None, 3])
@pytest.mark.parametrize("compile", [False])
def test_engine_syncs_once_per_step_with_and_without_logprobs(model, logprobs, compile):
    engine = Engine(model, max_batch=3, max_len=64, compile=compile)
    reqs = [engine.submit([5, 6, 7], 5, temperature=0.0, logprobs=logprobs,
                          prompt_logprobs=logprobs),
            engine.submit([8, 9], 4, temperature=0.8, seed=1, logprobs=logprobs),
            engine.submit([11, 12, 13, 14], 0, prompt_logprobs=logprobs or 2),  # scored only
            engine.submit([15], 3, temperature=0.0)]  # queued until a slot frees
    steps = 0
    with SyncCounter(label=lambda: steps) as syncs:
        while engine.has_work:
            engine.step()
            steps += 1
    counts = syncs.by_label()
    assert steps >= 5 and all(counts.get(s, 0) == 1 for s in range(steps)), syncs.describe()
    assert all(r.done and r.error is None for r in reqs)
    assert [len(r.tokens) for r in reqs] == [5, 4, 0, 3]
    if logprobs is not None:
        assert len(reqs[0].token_logprobs) == 5 and len(reqs[0].prompt_token_logprobs) == 3
        assert all(len(t.top) == logprobs for t in reqs[0].token_logprobs)
    assert len(reqs[2].prompt_token_logprobs) == 4


def test_logprobs_read_in_one_copy_equal_the_model_distribution(model):
    """The packed read gives the figures of the model's distribution: the prompt's and the
    first new token's (both from the prefill, so a plain forward of the prompt has them)."""
    engine = Engine(model, max_batch=2, max_len=32)
    req = engine.submit([5, 6, 7], 3, temperature=0.0, logprobs=4, prompt_logprobs=2)
    engine.run()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5, 6, 7]])).logits[0].double(), -1)
    first = req.token_logprobs[0]                                                # position 2
    assert req.tokens[0] == int(logp[2].argmax())
    assert first.logprob == pytest.approx(float(logp[2, req.tokens[0]]), abs=1e-5)
    top = torch.topk(logp[2], 4)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert all(isinstance(t, int) for t, _ in first.top)
    assert [v for _, v in first.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    for pos, rec in enumerate(req.prompt_token_logprobs[1:]):
        assert rec.logprob == pytest.approx(float(logp[pos, [6, 7][pos]]), abs=1e-5)
        assert len(rec.top) == 2
