"""The inference cache owns its per-slot state: each slot its own lengths, A and G_LM."""

import pytest
import torch

from pldr import InferenceCache
from fixture_utils import assert_same, fixture_model


def test_slots_keep_their_own_lengths_and_state():
    model = fixture_model().double()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[40, 41, 42]])
    nxt = torch.tensor([[11], [12]])
    cache = InferenceCache.for_mode(model.config, "kv_g", 2, 8, dtype=torch.float64)
    with torch.no_grad():
        model(a, cache=cache, slots=[0])
        model(b, cache=cache, slots=[1])
        assert cache.lengths.tolist() == [5, 3] and cache.seen.tolist() == [5, 3]
        both = model(nxt, cache=cache).logits[:, -1]               # one call, both slots
        assert cache.lengths.tolist() == [6, 4]
        for row, (prompt, tok) in enumerate(((a, 11), (b, 12))):
            own = InferenceCache.for_mode(model.config, "kv_g", 1, 8, dtype=torch.float64)
            model(prompt, cache=own)
            want = model(torch.tensor([[tok]]), cache=own).logits[0, -1]
            assert_same(both[row], want, what=f"slot {row}")
        cache.reset(1)
        assert cache.lengths.tolist() == [6, 0] and not cache.key_real[1].any()
        with pytest.raises(ValueError, match="mixes fresh slots"):
            model(nxt, cache=cache)
        model(a, cache=cache, slots=[1])                           # the slot reused
        assert cache.lengths.tolist() == [6, 5]
        assert_same(cache.A[:, 1], cache.A[:, 0], what="slot 1 has A of prompt a again")
        cache.release(0)                                           # idle: lengths stop
        model(nxt, cache=cache)
        assert cache.lengths.tolist() == [6, 6]


def test_a_given_G_LM_for_one_slot_only():
    model = fixture_model()
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    cache = InferenceCache.for_mode(model.config, "kv_only", 2, 8)
    cache.set_G_LM(eye, slot=1)
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    with torch.no_grad():
        out = model(ids, cache=cache, return_deductive=True)
    G = out.deductive.G_LM                                         # [L, 2, H, dk, dk]
    assert torch.equal(G[:, 1], torch.stack(eye)[:, 0])
    assert not torch.allclose(G[:, 0], G[:, 1])
    assert out.deductive.A is None  # a given row has no A to report


def test_a_long_prefill_attends_in_chunks_exactly(monkeypatch):
    from pldr.model import attention

    model = fixture_model().double()
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(0))

    def run():
        cache = InferenceCache.for_mode(model.config, "kv_g", 1, 41, dtype=torch.float64)
        with torch.no_grad():
            first = model(ids, cache=cache).logits
            return first, model(torch.tensor([[7]]), cache=cache).logits

    whole = run()
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)  # 40 queries: chunks of 16, 16, 8
    chunked = run()
    for a, b in zip(whole, chunked):
        assert_same(b, a, what="chunked prefill")


def test_a_listed_kv_g_step_reports_the_kept_deductive_outputs_when_asked():
    """A cached kv_g step on listed slots reports the A, A_LM, A_P and G_LM its slots kept
    from their prompts when asked for them, and gives the same logits when not."""
    model = fixture_model().double()
    cache = InferenceCache.for_mode(model.config, "kv_g", 3, 8, dtype=torch.float64)
    with torch.no_grad():
        for slot, prompt in enumerate(([5, 6, 7], [9, 3], [4, 4, 8, 2])):
            model(torch.tensor([prompt]), cache=cache, slots=[slot])
        step = torch.tensor([[11], [12]])
        kept = {name: getattr(cache, name)[:, [2, 0]].clone()
                for name in ("A_G", "A_LM", "A_P", "G_LM")}
        asked = model(step, cache=cache, slots=[2, 0], return_deductive=True)
        for slot in (2, 0):  # the same step again without deductive outputs
            cache.lengths[slot] -= 1
            cache.seen[slot] -= 1
        plain = model(step, cache=cache, slots=[2, 0])
    ded = asked.deductive
    for name, got in (("A_G", ded.A), ("A_LM", ded.A_LM), ("A_P", ded.A_P), ("G_LM", ded.G_LM)):
        assert torch.equal(got, kept[name]), name
    assert plain.deductive is None
    assert_same(plain.logits, asked.logits, what="the step without deductive outputs")
