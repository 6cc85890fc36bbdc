import json

import pytest
import torch

from pldr import InferenceCache
from pldr.model.attention import PowerLawAttention, PowerLawStep
from pldr.cli import main
from pldr.inference.generate import (CACHE_MODES, decode_step, generate, prefill, start, stream)
from pldr.inference.sampling import SamplingConfig, filter_logits
from fixture_utils import (FIXTURE, assert_matches_fixture, assert_same, expected,
                           fixture_model, fixture_v510G_model, generation, inputs)

PROMPTS = [[255, 84, 58, 257, 132, 129, 26, 174], [17, 5, 99], [42, 7, 280, 9, 12]]


@pytest.fixture(scope="module")
def model():
    return fixture_model()


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_greedy_streams_match_the_original(model, mode):
    gen = generation()
    out = generate(model, [gen["prompt"]], 16, cache=mode, temperature=0, eos_id=-1)
    assert out == [gen[mode]["new_tokens"]]


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_per_step_logits_match_the_original(model, mode):
    gen = generation()
    want = torch.load(FIXTURE / "generation_logits.pt", weights_only=True)[mode]  # [16, V]
    # no_cache recomputes A (hence G_LM) from the whole sequence at every step
    kind = "recomputed_logits" if mode == "no_cache" else "logits"
    state = start(model, [gen["prompt"]], mode, 16)
    with torch.no_grad():
        logits = prefill(model, state)
        for step, token in enumerate(gen[mode]["new_tokens"]):
            assert_matches_fixture(logits[0], want[step], kind, what=f"{mode} step {step}")
            if step < 15:
                logits = decode_step(model, state, torch.tensor([token]))


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_a_batch_equals_one_by_one(model, mode):
    alone = [generate(model, [p], 12, cache=mode, temperature=0, eos_id=-1)[0] for p in PROMPTS]
    batch = generate(model, PROMPTS, 12, cache=mode, temperature=0, eos_id=-1)
    assert batch == alone


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_a_batch_equals_one_by_one_in_float64_logits(mode):
    # the exact property behind the token test above: every step's logits of a left-padded
    # batch equal the row's own run (float64, 1e-10)
    model = fixture_model().double()
    feeds = [[7, 19, 3, 250, 31, 5], [8, 8, 2, 140, 77, 9], [1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        batch = start(model, PROMPTS, mode, 7)  # room for 6 fed tokens
        alone = [start(model, [p], mode, 7) for p in PROMPTS]
        got = prefill(model, batch)
        want = [prefill(model, s) for s in alone]
        for step in range(6):
            for b in range(len(PROMPTS)):
                assert_same(got[b], want[b][0], what=f"{mode} row {b} step {step}")
            nxt = torch.tensor([f[step] for f in feeds])
            got = decode_step(model, batch, nxt)
            want = [decode_step(model, s, nxt[b:b + 1]) for b, s in enumerate(alone)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_token_cached_step_equals_full_forward_with_the_same_A(dtype):
    model = fixture_model().to(dtype)
    ids = inputs()["tokens"][:1, :14]
    prompt, rest = ids[:, :8], ids[:, 8:]
    with torch.no_grad():
        # several tokens in one KV-cached call (A fixed by the prompt, G recomputed from it)
        kv = InferenceCache.for_mode(model.config, "kv_only", 1, 14, dtype=dtype)
        model(prompt, cache=kv)
        chunk = model(rest, cache=kv).logits                      # [1, 6, V]
        # one token at a time through the same cache
        kv1 = InferenceCache.for_mode(model.config, "kv_only", 1, 14, dtype=dtype)
        model(prompt, cache=kv1)
        steps = torch.cat([model(rest[:, i:i + 1], cache=kv1).logits for i in range(6)], 1)
        # the full sequence with G_LM fixed by the prompt (a filled G-cache)
        g = InferenceCache.for_mode(model.config, "g_only", 1, 0, dtype=dtype)
        model(prompt, cache=g)
        full = model(ids, cache=g).logits[:, 8:]
    assert_same(chunk, steps, what="chunk vs steps")
    assert_same(chunk, full, what="chunk vs full forward")
    assert kv.length == 14 and kv1.length == 14


def _count_calls(monkeypatch):
    calls = {"metric": 0, "power_law": 0}
    metric, power = PowerLawAttention.metric_tensor, PowerLawStep.forward

    def counted_metric(self, *a, **k):
        calls["metric"] += 1
        return metric(self, *a, **k)

    def counted_power(self, *a, **k):
        calls["power_law"] += 1
        return power(self, *a, **k)

    monkeypatch.setattr(PowerLawAttention, "metric_tensor", counted_metric)
    monkeypatch.setattr(PowerLawStep, "forward", counted_power)
    return calls


@pytest.mark.parametrize("mode, metric, power_law", [
    ("kv_g", 2, 2),          # only the prompt runs the metric learner and power-law step
    ("g_only", 2, 2),
    ("kv_only", 2, 2 * 6),   # A fixed by the prompt, G recomputed at each of 6 calls
    ("no_cache", 2 * 6, 2 * 6),
])
def test_G_cache_skips_the_metric_learner(model, monkeypatch, mode, metric, power_law):
    calls = _count_calls(monkeypatch)
    generate(model, [PROMPTS[0]], 6, cache=mode, temperature=0, eos_id=-1)
    assert calls == {"metric": metric, "power_law": power_law}


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_predefined_G_LM_bypasses_the_deep_network(model, monkeypatch, mode):
    calls = _count_calls(monkeypatch)
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    generate(model, [PROMPTS[0]], 4, cache=mode, temperature=0, G_LM=eye, eos_id=-1)
    assert calls == {"metric": 0, "power_law": 0}


def _given(model, G_LM, slots, A_LM=None):
    """A cache without a KV part whose every slot has the given G_LM."""
    cache = InferenceCache.for_mode(model.config, "no_cache", slots, 0)
    cache.set_G_LM(G_LM, A_LM)
    return cache


def test_identity_G_LM_on_v510_equals_the_v510G_identity_model(model):
    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    ids = inputs()["tokens"]
    with torch.no_grad():
        logits = model(ids, cache=_given(model, eye, len(ids))).logits
    assert_matches_fixture(logits, expected("v510G_identity_expected.pt")["tokens/logits"],
                           "logits")
    g_model = fixture_v510G_model()
    for mode in CACHE_MODES:
        assert (generate(model, PROMPTS, 10, cache=mode, temperature=0, G_LM=eye, eos_id=-1)
                == generate(g_model, PROMPTS, 10, cache=mode, temperature=0, eos_id=-1))


def test_sampling_with_a_seed_is_reproducible_and_batch_independent(model):
    kw = dict(temperature=1.0, top_p=0.9, seed=7, eos_id=-1)
    a = generate(model, PROMPTS, 12, **kw)
    assert a == generate(model, PROMPTS, 12, **kw)
    assert a[1] == generate(model, [PROMPTS[1]], 12, **kw)[0]
    assert a != generate(model, PROMPTS, 12, **(kw | {"seed": 8}))


def test_top_k_keeps_only_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    kept = filter_logits(logits, SamplingConfig(top_k=5)).isfinite()
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, logits >= logits.topk(5).values[:, -1:])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda p: filter_logits(logits, SamplingConfig(top_p=p)).isfinite()[0].tolist()  # noqa
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1e-6) == [True, False, False, False]  # never empty


def test_sampled_tokens_respect_top_k(model):
    out = generate(model, [PROMPTS[0]], 1, top_k=3, seed=1, eos_id=-1)
    with torch.no_grad():
        last = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert out[0][0] in last.topk(3).indices.tolist()


def test_rows_stop_at_their_eos(model):
    free = generate(model, PROMPTS, 10, temperature=0, eos_id=-1)
    eos = free[0][3]
    out = generate(model, PROMPTS, 10, temperature=0, eos_id=eos)
    assert out[0] == free[0][:free[0].index(eos) + 1]
    for row_free, row in zip(free[1:], out[1:]):
        want = row_free[:row_free.index(eos) + 1] if eos in row_free else row_free
        assert row == want


def test_stream_yields_step_by_step(model):
    steps = list(stream(model, PROMPTS[:2], 5, temperature=0, eos_id=-1))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)
    assert [s[0] for s in steps] == generate(model, [PROMPTS[0]], 5, temperature=0, eos_id=-1)[0]


def test_generation_fills_max_seq_len_exactly(model):
    # 8 prompt tokens + 249 new: the model runs 8 + 248 = 256 = max_seq_len positions
    for mode in ("kv_g", "no_cache"):
        out = generate(model, [PROMPTS[0]], 249, cache=mode, temperature=0, eos_id=-1)
        assert len(out[0]) == 249
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        generate(model, [PROMPTS[0]], 250, temperature=0)


def test_tensor_prompts(model):
    t = torch.tensor(PROMPTS[0])
    assert generate(model, t, 4, temperature=0) == generate(model, [PROMPTS[0]], 4, temperature=0)
    assert generate(model, t[None], 4, temperature=0) == generate(model, t, 4, temperature=0)


def test_bfloat16_generation_runs(model):
    low = fixture_model().to(torch.bfloat16)
    out = generate(low, PROMPTS, 6, temperature=0, eos_id=-1)
    assert all(len(r) == 6 and all(0 <= t < 300 for t in r) for r in out)
    assert out[0][0] == generate(model, [PROMPTS[0]], 1, temperature=0)[0][0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1, 300]]), "outside the vocabulary"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[1, 2, 3]), "wrap a single prompt"),
    (dict(prompts=[[1, 0, 2]]), "pad id"),
    (dict(max_new_tokens=250), "exceeds max_seq_len=256"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(cache="kv"), "unknown cache mode 'kv'"),
    (dict(G_LM=[torch.eye(8).expand(1, 4, 8, 8)] * 2), r"\[4, 16, 16\]"),
    (dict(G_LM=[torch.eye(16).expand(1, 4, 16, 16)] * 3), "has 3 layers but the model has 2"),
])
def test_bad_input_is_refused_before_any_work(model, monkeypatch, kwargs, message):
    calls = _count_calls(monkeypatch)
    args = dict(prompts=[[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert calls == {"metric": 0, "power_law": 0}


# ----- the command line ---------------------------------------------------------------------

def _cli(*extra):
    return ["generate", "--model", str(FIXTURE / "checkpoint.pth"), "--config",
            str(FIXTURE / "config.json"), *extra]


def test_cli_generates_the_fixture_stream(capsys):
    gen = generation()
    ids = ",".join(map(str, gen["prompt"]))
    assert main(_cli("--ids", ids, "--ids", "17,5,99", "--max-new-tokens", "16",
                     "--temperature", "0", "--eos-id", "-1", "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["ids"] == gen["kv_g"]["new_tokens"]
    assert rows[1]["ids"] == generate(fixture_model(), [[17, 5, 99]], 16, temperature=0,
                                      eos_id=-1)[0]

# parity with the original's numbers: .ci/run also runs these under AVX2-only kernels
pytestmark = pytest.mark.parity


@pytest.mark.parametrize("extra, message", [
    (["--ids", "1,2,x"], "comma-separated integers"),
    (["--ids", "1,2,3", "--top-p", "0"], "top_p"),
    (["--ids", "1,2,3", "--temperature", "-1"], "temperature"),
    (["--ids", "1,2,999"], "outside the vocabulary"),
    (["--ids", "1,2,3", "--max-new-tokens", "1000"], "max_seq_len"),
    (["--prompt", "hello"], "need a tokenizer"),
    ([], "at least one --prompt"),
    (["--ids", "1,2", "--cache", "bogus"], "invalid choice"),
])
def test_cli_bad_input_exits_2_with_one_error_line(capsys, extra, message):
    with pytest.raises(SystemExit) if "--cache" in extra else _no_raise():
        code = main(_cli(*extra))
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_text_prompt_with_a_model_directory(tmp_path, capsys):
    from pydoc_data.topics import topics

    from pldr import PLDRConfig, PLDRModel
    from pldr.data.tokenizer import Tokenizer

    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:40]], 400, str(tmp_path / "tok"))
    torch.manual_seed(0)
    cfg = PLDRConfig.preset("tiny").replace(vocab_size=tok.vocab_size, num_layers=1)
    PLDRModel(cfg).save_pretrained(tmp_path / "model", tokenizer=tok)
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "The class",
                 "--max-new-tokens", "6", "--seed", "3", "--eos-id", "-1"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "The class",
                 "--prompt", "Hello", "--max-new-tokens", "6", "--seed", "3", "--eos-id", "-1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    prompt = tok.encode("The class")[:-1]  # the EOS the tokenizer appends is dropped
    assert rows[0]["prompt_ids"] == prompt and len(rows[0]["ids"]) == 6
    # the prompt, then its continuation: the text decoding adds after the prompt's own
    whole, start = tok.decode(prompt + rows[0]["ids"]), tok.decode(prompt)
    assert whole.startswith(start) and rows[0]["text"] == whole[len(start):]
    assert streamed == "The class" + rows[0]["text"] + "\n"


def test_predefined_G_LM_reports_no_invented_deductive_outputs(model):
    from pldr import loss_with_dag

    eye = [torch.eye(16).expand(1, 4, 16, 16) for _ in range(2)]
    ids = inputs()["tokens"]
    with torch.no_grad():
        out = model(ids, cache=_given(model, eye, len(ids)), return_deductive=True)
    d = out.deductive
    assert d.A is None and d.A_LM is None and d.A_P is None
    assert torch.equal(d.G_LM[:, 0], torch.stack(eye)[:, 0])
    plain = loss_with_dag(out.logits[:, :-1], ids[:, 1:], d)  # no DAG values to log, no crash
    assert plain.dag == {} and torch.equal(plain.loss, plain.ce)
    with pytest.raises(ValueError, match="non-zero DAG coefficients"):
        loss_with_dag(out.logits[:, :-1], ids[:, 1:], d, (1.0, 0, 0))
    pairs = _given(model, eye, len(ids), A_LM=eye)  # a Gcachelst file has both
    with torch.no_grad():
        assert model(ids, cache=pairs, return_deductive=True).deductive.A_LM is not None
