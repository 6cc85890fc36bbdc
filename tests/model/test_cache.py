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
        real_keys = cache.tensors.key_real.sum(dim=1).tolist()   # the slots' real tokens
        assert cache.lengths == [5, 3] and real_keys == [5, 3]
        both = model(nxt, cache=cache).logits[:, -1]               # one call, both slots
        assert cache.lengths == [6, 4]
        for row, (prompt, tok) in enumerate(((a, 11), (b, 12))):
            own = InferenceCache.for_mode(model.config, "kv_g", 1, 8, dtype=torch.float64)
            model(prompt, cache=own)
            want = model(torch.tensor([[tok]]), cache=own).logits[0, -1]
            assert_same(both[row], want, what=f"slot {row}")
        cache.reset(1)
        assert cache.lengths == [6, 0] and not cache.tensors.key_real[1].any()
        with pytest.raises(ValueError, match="mixes fresh slots"):
            model(nxt, cache=cache)
        model(a, cache=cache, slots=[1])                           # the slot reused
        assert cache.lengths == [6, 5]
        A = cache.tensors.A
        assert_same(A[:, 1], A[:, 0], what="slot 1 has A of prompt a again")
        cache.release(0)                                           # idle: lengths stop
        model(nxt, cache=cache)
        assert cache.lengths == [6, 6]


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
        kept = {name: getattr(cache.tensors, name)[:, [2, 0]].clone()
                for name in ("A_G", "A_LM", "A_P", "G_LM")}
        asked = model(step, cache=cache, slots=[2, 0], return_deductive=True)
        for slot in (2, 0):  # the same step again without deductive outputs
            cache.state[slot].length -= 1
            cache.tensors.key_real[slot, cache.state[slot].length] = False
        plain = model(step, cache=cache, slots=[2, 0])
    ded = asked.deductive
    for name, got in (("A_G", ded.A), ("A_LM", ded.A_LM), ("A_P", ded.A_P), ("G_LM", ded.G_LM)):
        assert torch.equal(got, kept[name]), name
    assert plain.deductive is None
    assert_same(plain.logits, asked.logits, what="the step without deductive outputs")


def test_the_cache_holds_tensors_and_the_slot_state_lives_on_the_host():
    """One owner each: `CacheTensors` holds tensors only (all in `buffers()`, the list a
    compiled step pins), the slot state is plain Python on the host, and nothing else of
    the cache holds a tensor."""
    import dataclasses

    from pldr.model.cache import SlotState

    model = fixture_model()
    cache = InferenceCache.for_mode(model.config, "kv_g", 2, 8)
    tensors = vars(cache.tensors)
    assert all(t is None or isinstance(t, torch.Tensor) for t in tensors.values())
    assert {id(t) for t in tensors.values() if t is not None} == {id(t) for t in cache.tensors.buffers()}
    assert not [k for k, v in vars(cache).items() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache, slots=[0])
    for state in cache.state:
        assert isinstance(state, SlotState)
        assert all(type(getattr(state, f.name)) in (int, bool) for f in dataclasses.fields(state))
    assert cache.lengths == [3, 0] and cache.state[0].fresh is False and cache.state[1].fresh


def test_a_call_is_described_once_before_the_layers_and_the_description_is_frozen(monkeypatch):
    """Every layer of a forward receives the same frozen description, built before the
    first layer runs; a compiled step runs the layers on it without the host state."""
    import dataclasses

    from pldr.model import model as model_module

    model = fixture_model()
    cache = InferenceCache.for_mode(model.config, "kv_only", 1, 8)
    seen = []
    layer_forward = model_module.DecoderLayer.forward

    def spy(self, x, cos, sin, call):
        seen.append(call)
        return layer_forward(self, x, cos, sin, call)

    monkeypatch.setattr(model_module.DecoderLayer, "forward", spy)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache)
        model(torch.tensor([[8]]), cache=cache)
    first, second = seen[:2], seen[2:]
    assert len(seen) == 4 and first[0] is first[1] and second[0] is second[1]
    assert first[0].compute.keep_A and second[0].compute.reuse_A   # kv_only: A fixed, reused
    with pytest.raises(dataclasses.FrozenInstanceError):
        first[0].span = 3


def test_a_given_G_LM_is_checked_once_where_it_enters(monkeypatch, tmp_path):
    """generate, the engine, lm-eval's and the loaders' G_LM pass one shape check each,
    however many layers, requests and cache slots it then reaches."""
    from pldr import Engine, generate, load_G_LM, save_G_LM
    from pldr.checkpoint.load import load_for_inference
    from pldr.model import cache as cache_module
    from fixture_utils import fixture_v510G_model

    checks = []
    real = cache_module.stack_per_layer

    def counted(tensors, config, name="G_LM"):
        if config is not None:  # a file's own read (no model yet) is not a check against one
            checks.append(name)
        return real(tensors, config, name)

    monkeypatch.setattr(cache_module, "stack_per_layer", counted)
    model = fixture_model()
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    for mode in ("kv_g", "kv_only", "g_only", "no_cache"):
        checks.clear()
        generate(model, [[5, 6, 7], [9, 8]], 3, cache=mode, G_LM=eye, temperature=0)
        assert checks == ["G_LM"], mode
    checks.clear()
    engine = Engine(model, max_batch=2)
    for _ in range(3):
        engine.submit([5, 6, 7], 2, G_LM=eye, temperature=0)
    engine.run()
    assert checks == ["G_LM"] * 3  # once per request
    g_model = fixture_v510G_model()
    g_model.save_pretrained(tmp_path / "g")
    save_G_LM(eye, tmp_path / "eye.safetensors")
    checks.clear()
    _, given = load_for_inference(tmp_path / "g", G_LM=tmp_path / "eye.safetensors")
    assert checks == ["G_LM"] and torch.equal(given.G_LM, torch.stack(load_G_LM(tmp_path / "eye.safetensors"))[:, 0])


def test_the_engine_leaves_a_v510G_models_G_LM_in_the_model():
    """A v510G engine reads the model's own G_LM buffers through the call's description: it
    copies nothing into the cache, and its tokens equal generate alone."""
    from pldr import Engine, generate
    from fixture_utils import fixture_v510G_model

    model = fixture_v510G_model()
    with torch.no_grad():
        for layer in model.decoder.dec_layers:  # not the identity: a G_LM that matters
            layer.mha1.G_LM.add_(0.1 * torch.randn_like(layer.mha1.G_LM))
    engine = Engine(model, max_batch=2)
    reqs = [engine.submit(p, 4, temperature=0, eos_id=-1) for p in ([5, 6, 7], [9, 8, 4, 2])]
    engine.run()
    assert not engine.cache.tensors.G_LM.any()
    for req, prompt in zip(reqs, ([5, 6, 7], [9, 8, 4, 2])):
        assert req.tokens == generate(model, [prompt], 4, temperature=0, eos_id=-1,
                                      cache="no_cache")[0]


def test_a_call_that_fails_after_its_description_shifts_nothing():
    """A call whose layers never ran (an error, an interrupt) leaves the slot as it was: the
    next call gets the same positions and logits as if it had never been tried."""
    model = fixture_model().double()
    prompt, step = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])

    def cache_after_prompt():
        cache = InferenceCache.for_mode(model.config, "kv_g", 1, 8, dtype=torch.float64)
        with torch.no_grad():
            model(prompt, cache=cache)
        return cache

    clean, tried = cache_after_prompt(), cache_after_prompt()
    failed = model.describe(step, cache=tried)      # described, then the layers never run
    with torch.no_grad():
        want = model(step, cache=clean)
        got = model(step, cache=tried)
    assert failed.positions.tolist() == [[3, 4]] and tried.lengths == clean.lengths == [5]
    assert torch.equal(got.logits, want.logits)


def test_a_checked_G_LM_passes_with_its_A_LM_and_reads_as_the_per_layer_list():
    from pldr.model.cache import GivenG

    model = fixture_model()
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    A_LM = [2 * t for t in eye]
    given = GivenG.check(eye, model.config)
    assert len(given) == 2 and all(torch.equal(a, b) for a, b in zip(given, eye))
    assert torch.equal(torch.stack(list(given)), torch.stack(eye))
    cache = InferenceCache.for_mode(model.config, "no_cache", 1, 0)
    cache.set_G_LM(given, A_LM=A_LM)                 # a checked G_LM keeps the A_LM given now
    assert cache.state[0].given_A_LM and torch.equal(cache.tensors.A_LM[:, 0],
                                                     torch.stack(A_LM)[:, 0])


def test_a_listed_call_moves_a_released_slot_on():
    model = fixture_model()
    cache = InferenceCache.for_mode(model.config, "kv_only", 2, 8)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache=cache, slots=[0])
        model(torch.tensor([[9, 9]]), cache=cache, slots=[1])
        cache.release(0)
        model(torch.tensor([[8]]), cache=cache, slots=[0])     # listed: it moves
        model(torch.tensor([[8], [9]]), cache=cache)           # every slot: the idle one stays
    assert cache.lengths == [4, 3]
