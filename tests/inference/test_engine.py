"""The engine: continuous batching gives every request what `pldr.generate` gives its prompt
alone; compiled decode equals eager; a given G_LM wins on v510G models (Python and CLI)."""

import json

import pytest
import torch

import pldr
from pldr import Engine, InferenceCache, generate, load_model, save_G_LM
from pldr.cli import main
from pldr.model import attention
from fixture_utils import FIXTURE, fixture_config, fixture_model, fixture_v510G_model

PROMPTS = [[255, 84, 58, 257, 132, 129, 26, 174], [17, 5, 99], [42, 7, 280, 9, 12],
           [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [200, 3, 150, 4], [61, 62]]


@pytest.fixture(scope="module")
def model():
    return fixture_model()


def _alone(model, prompt, n, kw):
    return generate(model, [prompt], n, **kw)[0]


def test_requests_in_the_engine_equal_generate_alone(model):
    greedy = dict(temperature=0, eos_id=-1)
    # (arrives at step, prompt, max_new_tokens, settings)
    plan = [
        (0, PROMPTS[0], 10, greedy),
        (0, PROMPTS[1], 12, dict(temperature=1.0, top_p=0.9, seed=5, eos_id=-1)),
        (0, PROMPTS[2], 4, greedy),                                   # finishes first
        (1, PROMPTS[3], 9, dict(temperature=0.8, top_k=20, seed=9, eos_id=-1)),  # waits
        (2, PROMPTS[4], 30, greedy),                                  # cancelled mid-way
        (3, PROMPTS[5], 7, dict(temperature=1.2, seed=11, eos_id=-1)),
    ]
    # one request that stops at its own EOS: the third token it would generate
    stop = _alone(model, PROMPTS[2], 3, greedy)[2]
    plan.append((4, PROMPTS[2], 20, dict(temperature=0, eos_id=stop)))
    engine = Engine(model, max_batch=3)
    reqs, slots_seen = {}, {}
    step = 0
    while step < 60 and (engine.has_work or len(reqs) < len(plan)):
        for i, (at, prompt, n, kw) in enumerate(plan):
            if at == step:
                reqs[i] = engine.submit(prompt, n, **kw)
        if step == 2:
            assert len(engine.running) == 3 and len(engine.queued) == 2  # more requests than slots
        if 4 in reqs and len(reqs[4].tokens) == 3 and not reqs[4].done:  # mid-way
            assert reqs[4].slot is not None and not reqs[4].done
            engine.cancel(reqs[4])
        for r in engine.step():
            slots_seen.setdefault(r.slot, set()).add(r.id)
        step += 1
    assert not engine.has_work
    assert any(len(ids) > 1 for ids in slots_seen.values())  # a slot was reused
    for i, (_, prompt, n, kw) in enumerate(plan):
        req, want = reqs[i], _alone(model, prompt, n, kw)
        assert req.done
        if i == 4:
            assert req.finish_reason == "cancelled" and 0 < len(req.tokens) < n
            assert req.tokens == want[:len(req.tokens)]
        else:
            assert req.tokens == want, f"request {i}"
    assert reqs[6].finish_reason == "eos" and reqs[6].tokens[-1] == stop
    assert len(reqs[6].tokens) == 3


def test_engine_gives_each_request_its_own_G_LM(model):
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    engine = Engine(model, max_batch=2)
    own = engine.submit(PROMPTS[0], 8, temperature=0, eos_id=-1)
    given = engine.submit(PROMPTS[0], 8, temperature=0, eos_id=-1, G_LM=eye)
    engine.run()
    assert own.tokens == _alone(model, PROMPTS[0], 8, dict(temperature=0, eos_id=-1))
    assert given.tokens == _alone(model, PROMPTS[0], 8, dict(temperature=0, eos_id=-1, G_LM=eye))
    assert own.tokens != given.tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[1, 300]), "outside the vocabulary"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=100), "needs 107 positions but the engine holds 64"),
    (dict(top_p=0), "top_p"),
    (dict(seed="x"), "seed must be an int"),
    (dict(G_LM=[torch.eye(8).expand(1, 4, 8, 8)] * 2), r"\[4, 16, 16\]"),
])
def test_engine_refuses_bad_requests_at_submit(model, kwargs, message):
    engine = Engine(model, max_batch=2, max_len=64)
    args = dict(prompt_ids=PROMPTS[0], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        engine.submit(args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)
    assert not engine.has_work


def test_engine_bad_construction(model):
    with pytest.raises(ValueError, match="max_len must be an integer in"):
        Engine(model, max_len=1000)
    with pytest.raises(ValueError, match="use pldr.generate for g_only"):
        Engine(model, cache="g_only")


def test_a_list_of_seeds_gives_each_prompt_its_own_stream(model):
    kw = dict(temperature=1.0, eos_id=-1)
    both = generate(model, [PROMPTS[1], PROMPTS[1]], 10, seed=[3, 4], **kw)
    assert both[0] == generate(model, [PROMPTS[1]], 10, seed=3, **kw)[0]
    assert both[1] == generate(model, [PROMPTS[1]], 10, seed=4, **kw)[0]
    assert both[0] != both[1]
    same = generate(model, [PROMPTS[1], PROMPTS[1]], 10, seed=3, **kw)  # an int: alike
    assert same[0] == same[1] == both[0]
    for mode in ("g_only", "no_cache"):  # the re-run modes take a list too
        assert generate(model, [PROMPTS[1], PROMPTS[1]], 6, seed=[3, 4], cache=mode, **kw) == [
            generate(model, [PROMPTS[1]], 6, seed=s, cache=mode, **kw)[0] for s in (3, 4)]
    with pytest.raises(ValueError, match="seed has 1 values for 2 prompts"):
        generate(model, [PROMPTS[1], PROMPTS[2]], 4, seed=[1])


@pytest.mark.parity
def test_compiled_decode_gives_the_same_tokens_as_eager(model):
    # one small case: torch.compile costs ~20 s cold on CPU. It compiles one graph for all
    # steps: a step that read per-slot host state (the cache's written positions) was
    # recompiled at every step, since dynamo guards on such values (7 graphs for 8 tokens)
    from torch._dynamo.utils import counters

    kw = dict(temperature=0, eos_id=-1)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, PROMPTS[:3], 8, compile=True, **kw) == generate(model, PROMPTS[:3], 8, **kw)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    with pytest.raises(ValueError, match="compile=True needs a KV-cache mode"):
        generate(model, PROMPTS[:1], 4, cache="no_cache", compile=True)


# ----- attention calls ----------------------------------------------------------------------

def test_uncached_unpadded_calls_are_causal_and_cached_ones_masked(model, monkeypatch):
    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False):
        seen.append((attn_mask is None, is_causal, q.shape[2], k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        model(ids)
        assert seen == [(True, True, 8, 8)] * 2
        seen.clear()
        model(torch.tensor([[0, 0] + PROMPTS[0]]))  # padded
        assert seen == [(False, False, 10, 10)] * 2
        seen.clear()
        cache = InferenceCache.for_mode(model.config, "kv_g", 1, 12)
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)  # one query over 9 keys: is_causal would be wrong
        # a cached call attends over the positions its slots hold, not the whole buffer
        assert seen == [(False, False, 8, 8)] * 2 + [(False, False, 1, 9)] * 2
        seen.clear()
        static = InferenceCache.for_mode(model.config, "kv_g", 1, 12, static=True)
        model(ids, cache=static)
        model(ids[:, :1], cache=static)  # static shapes (compile): every call over all 12
        assert seen == [(False, False, 8, 12)] * 2 + [(False, False, 1, 12)] * 2


def test_cached_calls_do_no_value_check(model, monkeypatch):
    # the one sync of an uncached call (the ids' range) is not made by cached calls
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or real(t))
    cache = InferenceCache.for_mode(model.config, "kv_g", 2, 12)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0], PROMPTS[0]]), cache=cache)
        model(torch.tensor([[5], [6]]), cache=cache)
        assert calls == []
        model(torch.tensor([PROMPTS[0]]))
        assert calls == [1]


# ----- a given G_LM on v510G models -----------------------------------------------------------

def _G(model):
    return pldr.infer_G_LM(model, torch.tensor([PROMPTS[3]]))


def test_a_given_G_LM_wins_over_the_v510G_buffer(model):
    G = _G(model)
    identity = fixture_v510G_model()
    built = pldr.PLDRModel(identity.config, G_LM=G)  # the same weights, G as its buffer
    built.load_state_dict({k: v for k, v in identity.state_dict().items()
                           if not k.endswith("mha1.G_LM")}, strict=False)
    built.eval()
    for mode in pldr.inference.CACHE_MODES:
        kw = dict(cache=mode, temperature=0, eos_id=-1)
        given = generate(identity, PROMPTS[:3], 8, G_LM=G, **kw)
        assert given == generate(built.eval(), PROMPTS[:3], 8, **kw), mode
        assert given != generate(identity, PROMPTS[:3], 8, **kw), mode


def _cli_ids(args, capsys):
    assert main(["generate", *args, "--ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens",
                 "8", "--temperature", "0", "--eos-id", "-1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)[0]["ids"]


def test_cli_G_LM_loads_an_original_v510G_pth_and_wins_in_a_directory(model, tmp_path, capsys):
    G = _G(model)
    save_G_LM(G, tmp_path / "G.safetensors")
    want = generate(fixture_v510G_model(), [PROMPTS[0]], 8, temperature=0, eos_id=-1, G_LM=G)[0]
    pth = str(FIXTURE / "v510G_identity_checkpoint.pth")
    config = str(FIXTURE / "config.json")
    # an original v510G .pth holds no G_LM: without --G-LM it is a clear error
    assert main(["generate", "--model", pth, "--config", config, "--ids", "1,2"]) == 2
    assert "--G-LM" in capsys.readouterr().err
    got = _cli_ids(["--model", pth, "--config", config, "--G-LM", str(tmp_path / "G.safetensors")],
                   capsys)
    assert got == want
    # a directory holds its own (identity) G_LM; the given one wins
    identity = load_model(pth, fixture_config(metric_includes_pad=True),
                          G_LM=[torch.eye(16).expand(1, 4, 16, 16)] * 2)
    identity.save_pretrained(tmp_path / "dir")
    assert _cli_ids(["--model", str(tmp_path / "dir")], capsys) != want
    assert _cli_ids(["--model", str(tmp_path / "dir"), "--G-LM",
                     str(tmp_path / "G.safetensors")], capsys) == want


def test_nan_logits_end_that_request_only_and_free_its_slot():
    """A token whose embedding is NaN makes the logits of every request holding it NaN:
    that request ends with finish_reason "error" and its error, its slot is cleared and
    reused, and the requests beside it and after it get what `generate` gives them alone."""
    from pldr.inference.sampling import NonFiniteLogitsError

    model = fixture_model()
    with torch.no_grad():
        model.decoder.embedding.weight[77] = float("nan")
    greedy = dict(temperature=0, eos_id=-1)
    engine = Engine(model, max_batch=2)
    good = engine.submit(PROMPTS[0], 6, **greedy)
    bad = engine.submit([5, 77, 9], 6, **greedy)
    for _ in range(3):
        engine.step()
    assert bad.done and bad.finish_reason == "error" and bad.tokens == []
    assert isinstance(bad.error, NonFiniteLogitsError) and "NaN or inf" in str(bad.error)
    assert bad.slot is None and not good.done
    # the failed slot is reused: its NaN keys and values were cleared
    after = engine.submit(PROMPTS[1], 5, **greedy)
    sampled = engine.submit(PROMPTS[2], 5, temperature=0.9, seed=3, eos_id=-1)
    engine.run()
    assert good.tokens == _alone(model, PROMPTS[0], 6, greedy)
    assert after.tokens == _alone(model, PROMPTS[1], 5, greedy)
    # scoring a prompt that holds the token (no new tokens) fails the same way, logprobs
    # and all, and the slot serves the next request
    scored = engine.submit([5, 77, 9], 0, prompt_logprobs=1)
    clean = engine.submit(PROMPTS[1], 0, prompt_logprobs=1)
    engine.run()
    assert scored.finish_reason == "error" and isinstance(scored.error, NonFiniteLogitsError)
    assert clean.finish_reason == "length" and all(
        r is None or r.logprob == r.logprob for r in clean.prompt_token_logprobs)
    assert sampled.tokens == _alone(model, PROMPTS[2], 5, dict(temperature=0.9, seed=3,
                                                                 eos_id=-1))
    # a request that goes bad mid-way (decode, not prefill) ends the same way
    late = engine.submit([5, 6, 7], 4, **greedy)
    engine.step()
    with torch.no_grad():
        model.final_layer.bias[0] = float("nan")
    engine.run()
    assert late.finish_reason == "error" and len(late.tokens) == 1 and not engine.has_work


def test_steps_run_every_slot_while_most_are_busy_and_listed_slots_otherwise(monkeypatch):
    """Steps over every slot (idle ones included: one left by a request that used every
    position of the model, longer than any running one) and steps over the listed busy
    slots both give each request its tokens alone."""
    model = fixture_model(max_seq_len=32)
    greedy = dict(temperature=0, eos_id=-1)
    engine = Engine(model, max_batch=3)                     # max_len = max_seq_len = 32
    calls = []  # (slots of a decode call, busy requests, the longest idle slot's positions)
    forward = type(model).forward

    def spy(self, ids, **kw):
        if kw.get("cache") is not None and ids.shape[1] == 1:
            c = kw["cache"]
            idle = [s.length for s in c.state if not s.live]
            calls.append((kw.get("slots"), len(engine.running), max(idle, default=0)))
        return forward(self, ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    full = engine.submit(PROMPTS[2], 28, **greedy)          # 5 + 28 - 1 = 32 positions
    plan = [(full, PROMPTS[2], 28)]
    step = 0
    while engine.has_work and step < 80:
        if step == 20:                                      # two arrive late: they outlive it
            plan += [(engine.submit(PROMPTS[1], 16, **greedy), PROMPTS[1], 16),
                     (engine.submit(PROMPTS[5], 12, **greedy), PROMPTS[5], 12)]
        engine.step()
        step += 1
    plan.append((engine.submit(PROMPTS[4], 6, **greedy), PROMPTS[4], 6))  # alone: listed
    engine.run()
    monkeypatch.setattr(type(model), "forward", forward)
    assert full.finish_reason == "length"
    every = [(busy, idle) for slots, busy, idle in calls if slots is None]
    assert (2, 32) in every                    # the full slot idle beside two busy ones
    assert max(busy for slots, busy, _ in calls if slots is not None) == 1
    for req, prompt, n in plan:
        assert req.tokens == _alone(model, prompt, n, greedy)


def _prompt_logprobs(model, ids):
    """log_softmax of an uncached forward over ids [T] (A and G_LM from them, as a prefill
    fixes them): row t is the distribution of id t+1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def _decode_logprobs(model, prompt, tokens):
    """log_softmax of the logits generation computes for each of `tokens` after `prompt` (a
    kv_g cache: G_LM from the prompt) -> [len(tokens), V]."""
    from pldr.inference.generate import decode_step, prefill, start

    with torch.no_grad():
        state = start(model, [prompt], "kv_g", len(tokens))
        rows = [prefill(model, state)[0]]
        for tok in tokens[:-1]:
            rows.append(decode_step(model, state, torch.tensor([tok]))[0])
    return torch.log_softmax(torch.stack(rows).double(), -1)


def test_logprobs_are_the_models_distribution_at_every_position(model):
    """Prompt and new tokens' log-probabilities (float64, so cached == uncached to 1e-10) and
    their top-k, for greedy and sampled requests side by side; sampling does not change the
    tokens of a request that asks for them."""
    m64 = fixture_model().double()
    engine = Engine(m64, max_batch=2)
    sampled = dict(temperature=1.3, top_k=30, seed=3, eos_id=-1)
    a = engine.submit(PROMPTS[0], 6, temperature=0, eos_id=-1, logprobs=3, prompt_logprobs=2)
    b = engine.submit(PROMPTS[3], 5, **sampled, logprobs=0)
    c = engine.submit(PROMPTS[1], 4, **sampled)                  # no logprobs: none recorded
    engine.run()
    assert b.tokens == _alone(m64, PROMPTS[3], 5, sampled) and c.token_logprobs == []
    for req, k in ((a, 3), (b, 0)):
        want = _decode_logprobs(m64, req.prompt, req.tokens)     # [new, V]
        assert len(req.token_logprobs) == len(req.tokens)
        for j, rec in enumerate(req.token_logprobs):
            row = want[j]
            assert rec.logprob == pytest.approx(row[req.tokens[j]].item(), abs=1e-10)
            top = row.topk(k)
            assert [t for t, _ in rec.top] == top.indices.tolist()
            assert [v for _, v in rec.top] == pytest.approx(top.values.tolist(), abs=1e-10)
    # greedy: every new token is the most likely one, with the top logprob
    assert all(rec.top[0] == (tok, rec.logprob) for tok, rec in zip(a.tokens, a.token_logprobs))
    prompt = a.prompt_token_logprobs
    assert prompt[0] is None and len(prompt) == len(a.prompt)
    want = _prompt_logprobs(m64, a.prompt)
    for t in range(1, len(a.prompt)):
        assert prompt[t].logprob == pytest.approx(want[t - 1][a.prompt[t]].item(), abs=1e-10)
        assert [i for i, _ in prompt[t].top] == want[t - 1].topk(2).indices.tolist()


def test_max_new_tokens_0_with_prompt_logprobs_scores_the_prompt_only(model):
    engine = Engine(model, max_batch=1)
    scored = [engine.submit(p, 0, prompt_logprobs=1) for p in PROMPTS[:3]]
    plain = engine.submit(PROMPTS[0], 0)                          # nothing asked: done at once
    assert plain.done and plain.finish_reason == "length" and plain.prompt_token_logprobs is None
    ended = engine.step()  # one slot: the scoring requests pass through it in one step
    assert ended == scored and not engine.has_work
    for req in scored:
        assert req.done and req.finish_reason == "length" and req.tokens == []
        assert len(req.prompt_token_logprobs) == len(req.prompt)
    one = engine.submit([42], 0, prompt_logprobs=4)
    engine.run()
    assert one.prompt_token_logprobs == [None]


@pytest.mark.parametrize("kwargs", [dict(logprobs=-1), dict(logprobs=21), dict(logprobs=True),
                                    dict(prompt_logprobs=2.0)])
def test_bad_logprobs_are_refused_at_submit(model, kwargs):
    engine = Engine(model, max_batch=1)
    with pytest.raises(pldr.PLDRError, match="logprobs must be None or an integer in"):
        engine.submit(PROMPTS[0], 2, **kwargs)
