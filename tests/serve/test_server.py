"""`pldr serve` against a real uvicorn server on 127.0.0.1 (a free port), with the official
`openai` client and raw HTTP. Every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the maintained httpx fork that openai and huggingface_hub use
import openai
import pytest
from fixture_utils import free_port
import torch

from pldr import PLDRConfig, PLDRModel, generate, load_model
from pldr.data.tokenizer import Tokenizer

KEY = "test-key-123"
PROMPTS = ["The class", "Hello world", "import os", "def f(x):", "A list of", "Python is",
           "The function returns", "for i in range"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("serve")
    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:60]], 400, str(root / "tok"))
    torch.manual_seed(0)
    cfg = PLDRConfig.preset("tiny").replace(vocab_size=tok.vocab_size, num_layers=1,
                                            max_seq_len=96)
    PLDRModel(cfg).save_pretrained(root / "model", tokenizer=tok)
    return root / "model"


class Server:
    """A `pldr serve` subprocess; `url` once /health answers."""

    def __init__(self, model_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PLDR_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pldr", "serve", "--model", str(model_dir), "--port",
             str(self.port), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited: " + self.proc.stdout.read())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not become healthy within 60 s")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-batch", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    model = load_model(model_dir)
    tok = Tokenizer.load(model_dir / "tokenizer.model")
    return model, tok


def _continuation(tok, prompt_ids, ids) -> str:
    """The text `ids` add after the prompt's (its first piece keeps its space, as vLLM's)."""
    return tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]


def _alone(reference, prompt: str, n: int, **kw) -> str:
    model, tok = reference
    prompt_ids = tok.encode(prompt, eos=False)
    ids = generate(model, [prompt_ids], n, **kw)[0]
    return _continuation(tok, prompt_ids, ids), ids


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["model"]
    assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}


def test_a_completion_has_openai_fields(client, reference):
    r = client.completions.create(model="model", prompt="The class", max_tokens=8,
                                  temperature=0)
    text, ids = _alone(reference, "The class", 8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "model"
    assert r.choices[0].text == text and r.choices[0].index == 0
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == 3 else "length")
    prompt_len = len(reference[1].encode("The class", eos=False))
    assert r.usage.prompt_tokens == prompt_len and r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == prompt_len + len(ids)


def test_prompt_forms_and_echo(server, reference):
    model, tok = reference
    ids = tok.encode("Hello world", eos=False)
    want, _ = _alone(reference, "Hello world", 5, temperature=0)
    for prompt in ("Hello world", ["Hello world"], ids, [ids]):
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "model", "prompt": prompt, "max_tokens": 5, "temperature": 0}).json()
        assert [c["text"] for c in r["choices"]] == [want]
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "model", "prompt": ["Hello world", "import os"], "max_tokens": 5,
        "temperature": 0, "echo": True, "n": 2}).json()
    texts = [c["text"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] == tok.decode(ids) + want
    assert texts[2].startswith(tok.decode(tok.encode("import os", eos=False)))


def test_streaming_concatenates_to_the_plain_text(client):
    kw = dict(model="model", prompt="The function returns", max_tokens=20, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "model", "prompt": "A list of", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] >= 1


def test_a_stream_of_several_choices_matches_the_plain_texts(server):
    # 2 prompts x n=2, seeded sampling: the stream interleaves four choices (chunks of one
    # step may share a write); each choice's pieces still join to its plain text
    body = {"model": "model", "prompt": ["Hello world", "import os"], "n": 2, "max_tokens": 8,
            "temperature": 0.9, "seed": 11}
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    want = {c["index"]: (c["text"], c["finish_reason"]) for c in plain["choices"]}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    reasons: dict[int, list] = {}
    for event in events[:-1]:
        (choice,) = json.loads(event)["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert {i: (texts[i], reasons[i][-1]) for i in texts} == want
    assert all(r[-1] is not None and not any(r[:-1]) for r in reasons.values())


def test_32_concurrent_requests_each_equal_generate_alone(server, reference):
    jobs = [(PROMPTS[i % len(PROMPTS)] + " x" * (i // len(PROMPTS)), 4 + (i * 7) % 23)
            for i in range(32)]

    def ask(job):
        prompt, n = job
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": "model", "prompt": prompt, "max_tokens": n, "temperature": 0})
        return r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, n), text in zip(jobs, got):
        assert text == _alone(reference, prompt, n, temperature=0)[0], (prompt, n)


def test_seeded_sampling_is_reproducible(client, reference):
    kw = dict(model="model", prompt="Python is", max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert a == client.completions.create(seed=11, **kw).choices[0].text
    assert a == _alone(reference, "Python is", 16, temperature=1.0, top_p=0.9, seed=11)[0]
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (12, 13, 14)}
    assert others != {a}


def test_a_stop_string_ends_the_text(client):
    kw = dict(model="model", prompt="for i in range", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), "the untrained model printed only spaces"
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"
    streamed = client.completions.create(stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == r.text


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    before = server.metric("pldr_requests_cancelled_total")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": "model", "prompt": "The class", "max_tokens": 90, "stream": True,
            "temperature": 0.9, "seed": 1}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (server.metric("pldr_requests_cancelled_total") > before
                and server.metric("pldr_running_slots") == 0):
            break
        time.sleep(0.1)
    assert server.metric("pldr_requests_cancelled_total") == before + 1
    assert server.metric("pldr_running_slots") == 0
    assert server.metric("pldr_queue_depth") == 0


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metric("pldr_generation_tokens_total")
    client.completions.create(model="model", prompt="Hello world", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", timeout=5).text
    assert 'pldr_requests_total{status="200"}' in text
    assert "pldr_time_to_first_token_seconds_bucket" in text
    assert "pldr_time_per_output_token_seconds_count" in text
    assert server.metric("pldr_generation_tokens_total") >= before + 1
    assert server.metric("pldr_prompt_tokens_total") > 0


def _prompt_logprobs(model, ids):
    """log_softmax of an uncached forward over ids (A and G_LM from all of them, as the
    prefill of that prompt fixes them): row t is the distribution of id t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)


def _decode_logprobs(model, prompt, tokens):
    """log_softmax of the logits generation computes for each of `tokens` after `prompt`."""
    from pldr.inference.generate import decode_step, prefill, start

    with torch.no_grad():
        state = start(model, [prompt], "kv_g", len(tokens))
        rows = [prefill(model, state)[0]]
        for tok in tokens[:-1]:
            rows.append(decode_step(model, state, torch.tensor([tok]))[0])
    return torch.log_softmax(torch.stack(rows), -1)


def _post(server, **body):
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={"model": "model", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_logprobs_of_new_tokens_are_the_models(server, reference):
    model, tok = reference
    prompt = tok.encode("The function returns", eos=False)
    r = _post(server, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
    _, ids = _alone(reference, "The function returns", 10, temperature=0)
    want = _decode_logprobs(model, prompt, ids)
    assert lp["token_logprobs"] == pytest.approx([want[j, t].item() for j, t in enumerate(ids)],
                                                 abs=1e-4)
    for j, top in enumerate(lp["top_logprobs"]):
        best = want[j].topk(3)
        assert 3 <= len(top) <= 4 and max(top.values()) == lp["token_logprobs"][j]  # greedy
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(),
                                                                       abs=1e-4)
    # the openai client reads them too
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    got = c.completions.create(model="model", prompt=prompt, max_tokens=10, temperature=0,
                               logprobs=3).choices[0].logprobs
    assert got.token_logprobs == lp["token_logprobs"] and got.tokens == lp["tokens"]


def test_echo_with_logprobs_scores_the_prompt(server, reference):
    model, tok = reference
    ids = tok.encode("A list of numbers", eos=False)
    r = _post(server, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids) == "".join(lp["tokens"])
    assert len(lp["tokens"]) == len(ids) and r["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = _prompt_logprobs(model, ids)
    assert lp["token_logprobs"][1:] == pytest.approx(
        [want[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    # a prompt that fills the whole context can be scored (and given one new token)
    full = [5 + i % 50 for i in range(96)]
    r = _post(server, prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert len(r["choices"][0]["logprobs"]["tokens"]) == 96
    assert _post(server, prompt=full, max_tokens=1)["usage"]["completion_tokens"] == 1
    # with new tokens after the echo: prompt entries first, then those of the new tokens
    r = _post(server, prompt=ids, max_tokens=4, echo=True, logprobs=2, temperature=0)
    lp2 = r["choices"][0]["logprobs"]
    assert lp2["token_logprobs"][:len(ids)] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert len(lp2["tokens"]) == len(ids) + r["usage"]["completion_tokens"]
    assert "".join(lp2["tokens"]) == r["choices"][0]["text"]


def test_streamed_logprobs_join_to_the_plain_ones(server):
    body = dict(prompt="Hello world", max_tokens=12, temperature=0, logprobs=2, echo=True)
    plain = _post(server, **body)["choices"][0]["logprobs"]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "model", **body, "stream": True}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    joined = {k: [] for k in plain}
    for event in events[:-1]:
        for k, v in json.loads(event)["choices"][0]["logprobs"].items():
            joined[k] += v
    assert joined["tokens"] == plain["tokens"]
    assert joined["text_offset"] == plain["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(plain["token_logprobs"], abs=1e-6)


def test_tokenizer_routes_as_vllm_serves_them(server, reference):
    _, tok = reference
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, timeout=30).json()
    assert r["tokens"] == tok.encode("Hello world", eos=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 96
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id) and info["bos_token"] is None
    eos = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"],
                                                     "add_special_tokens": False}, timeout=30)
    assert eos.json()["tokens"] == [tok.eos_id]  # the special piece's text is its id
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30)
    assert back.json() == {"prompt": "Hello world"}
    for path, body, param in [("/tokenize", {"prompt": 5}, "prompt"),
                              ("/tokenize", {"prompt": "a", "add_special_tokens": "no"},
                               "add_special_tokens"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
                              ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
                              ("/tokenize", {"prompt": "a\ud800"}, "prompt"),  # not UTF-8
                              ("/detokenize", {"tokens": [1, "a"]}, "tokens"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens")]:
        r = httpx.post(server.url + path, content=json.dumps(body), timeout=30,
                       headers={"content-type": "application/json"})
        assert _assert_error_shape(r, 404 if param == "model" else 400)["param"] == param


def test_lm_eval_local_completions_runs_against_the_server(server, reference, tmp_path):
    """lm-eval's own OpenAI-API model, offline: it finds the server's tokenizer routes
    (tokenizer_backend auto -> remote), scores every choice with echo + logprobs (each equal
    to the model's log-probabilities over that whole prompt) and generates until its stop
    strings (each equal to greedy `pldr.generate` on the context)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = reference
    questions = [("The class statement", [" defines a class", " loops"], 0),
                 ("A for loop", [" iterates", " is a number"], 0),
                 ("Python is", [" a language", " a snake"], 1)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in questions))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" \
             "test_split: test\ndoc_to_text: \"{{question}}\"\n"
    (tmp_path / "mc.yaml").write_text("task: serve_toy_mc\n" + common + """\
output_type: multiple_choice
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (tmp_path / "gen.yaml").write_text("task: serve_toy_gen\n" + common + """\
output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"base_url={server.url}/v1/completions,"
        "model=model,max_length=96,max_retries=1", tasks=["serve_toy_mc", "serve_toy_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    for s in out["samples"]["serve_toy_mc"]:
        q, choices, _ = questions[s["doc_id"]]
        for (score, _), cont in zip((r[0] for r in s["resps"]), choices):
            ctx, whole = tok.encode(q, eos=False), tok.encode(q + cont, eos=False)
            logp = _prompt_logprobs(model, whole)
            want = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
            assert score == pytest.approx(want, abs=1e-4)
    for s in out["samples"]["serve_toy_gen"]:
        q = questions[s["doc_id"]][0]
        ctx = tok.encode(q, eos=False)
        text = _continuation(tok, ctx, generate(model, [ctx], 6, temperature=0)[0])
        assert s["resps"][0][0] == text.split(".")[0]


MALFORMED = [
    ({"prompt": "hi", "max_tokens": 4}, 400, "model"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
    ({"model": 5, "prompt": "hi"}, 400, "model"),
    ({"model": "model"}, 400, "prompt"),
    ({"model": "model", "prompt": ""}, 400, "prompt"),
    ({"model": "model", "prompt": []}, 400, "prompt"),
    ({"model": "model", "prompt": [[]]}, 400, "prompt"),
    ({"model": "model", "prompt": 42}, 400, "prompt"),
    ({"model": "model", "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": "model", "prompt": "half \ud800 a character"}, 400, "prompt"),  # not UTF-8
    ({"model": "model", "prompt": [5, 99999]}, 400, "prompt"),
    ({"model": "model", "prompt": [-1, 5]}, 400, "prompt"),
    ({"model": "model", "prompt": [5, 0, 7]}, 400, "prompt"),  # the pad id inside a prompt
    ({"model": "model", "prompt": [5] * 200}, 400, "prompt"),
    ({"model": "model", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "model", "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "model", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "model", "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "model", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "model", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "model", "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"model": "model", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "model", "prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"model": "model", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "model", "prompt": "hi", "n": 1000}, 400, "n"),
    ({"model": "model", "prompt": "hi", "seed": "abc"}, 400, "seed"),
    ({"model": "model", "prompt": "hi", "seed": 2**70}, 400, "seed"),
    ({"model": "model", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": "model", "prompt": "hi", "echo": 1}, 400, "echo"),
    ({"model": "model", "prompt": "hi", "stop": 5}, 400, "stop"),
    ({"model": "model", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "model", "prompt": "hi", "stop": [str(i) for i in range(17)]}, 400, "stop"),
    ({"model": "model", "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ({"model": "model", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "model", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"model": "model", "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"model": "model", "prompt": "hi", "frobnicate": True}, 400, "frobnicate"),
    ({"model": "model", "prompt": "hi", "stream_options": {"x": 1}}, 400, "stream_options"),
    ([1, 2, 3], 400, None),
]


def _assert_error_shape(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    return err


@pytest.mark.parametrize("body, status, param", MALFORMED)
def test_malformed_requests_get_a_4xx_in_openai_shape(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(body), timeout=30,
                   headers={"content-type": "application/json"})  # lone surrogates escaped
    assert _assert_error_shape(r, status)["param"] == param


def test_broken_bodies_and_routes(server, client):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"},
                   timeout=30)
    _assert_error_shape(r, 400)
    r = httpx.post(url, content=b"\xff\xfe", timeout=30)
    _assert_error_shape(r, 400)
    r = httpx.post(url, content=b"x" * (2 << 20), timeout=30)
    _assert_error_shape(r, 413)
    _assert_error_shape(httpx.get(url, timeout=30), 405)
    _assert_error_shape(httpx.get(server.url + "/v1/nothing", timeout=30), 404)
    # and the server still answers correctly afterwards
    r = client.completions.create(model="model", prompt="Hello world", max_tokens=3,
                                  temperature=0)
    assert r.usage.completion_tokens >= 1


def test_api_key_queue_limit_and_sigterm_during_a_stream(model_dir):
    s = Server(model_dir, "--api-key", KEY, "--max-batch", "1", "--max-queue", "1",
               "--max-len", "90")
    try:
        url = s.url + "/v1/completions"
        body = {"model": "model", "prompt": "The class", "max_tokens": 4}
        assert _assert_error_shape(httpx.post(url, json=body, timeout=30), 401)["code"] \
            == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        _assert_error_shape(httpx.post(url, json=body, headers=bad, timeout=30), 401)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(url, json=body, headers=auth, timeout=60).status_code == 200
        # --max-len: the slots hold 90 positions, and requests must fit in them
        models = httpx.get(s.url + "/v1/models", headers=auth, timeout=30).json()
        assert models["data"][0]["max_model_len"] == 90
        fits = dict(body, prompt=[5, 6, 7], max_tokens=88, temperature=0)
        assert httpx.post(url, json=fits, headers=auth, timeout=60).status_code == 200
        r = httpx.post(url, json=dict(fits, max_tokens=89), headers=auth, timeout=30)
        assert _assert_error_shape(r, 400)["param"] == "max_tokens"
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200  # no key needed
        for path in ("/tokenize", "/detokenize"):  # the tokenizer routes need it too
            r = httpx.post(s.url + path, json={"prompt": "a", "tokens": [5]}, timeout=30)
            _assert_error_shape(r, 401)
        _assert_error_shape(httpx.get(s.url + "/tokenizer_info", timeout=30), 401)

        # one slot, one place in the queue: of 5 long requests at once, some get 429
        long = dict(body, max_tokens=80, temperature=0.9, seed=3)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            codes = list(pool.map(lambda _: httpx.post(url, json=long, headers=auth,
                                                       timeout=120), range(5)))
        refused = [r for r in codes if r.status_code == 429]
        assert refused and all(r.headers.get("retry-after") for r in refused)
        assert {r.status_code for r in codes} <= {200, 429}

        # SIGTERM while a stream runs: the stream finishes, then the server exits 0
        with httpx.stream("POST", url, headers=auth, timeout=60,
                          json=dict(long, stream=True)) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first and rest[-1] == "data: [DONE]"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_cli_refuses_bad_flags(model_dir, capsys):
    from pldr.cli import main

    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--port", "70000"]) == 2
    assert main(["serve", "--model", str(model_dir), "--threads", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--max-len", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--max-len", "97", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(e.startswith("error:") for e in err)
    assert "max_len must be an integer in [1, 96]" in err[-1]  # from the engine process


def test_an_empty_PLDR_API_KEY_is_no_key(monkeypatch):
    from pldr.cli.main import build_parser

    monkeypatch.setenv("PLDR_API_KEY", "")
    assert build_parser().parse_args(["serve", "--model", "m"]).api_key is None
    monkeypatch.setenv("PLDR_API_KEY", "k1")
    assert build_parser().parse_args(["serve", "--model", "m"]).api_key == "k1"


def test_a_refused_serve_leaves_the_processes_torch_threads_alone(model_dir, tmp_path, capsys):
    """--threads applies for the server's lifetime only: a serve that fails after loading
    (here: a tokenizer larger than the model's vocabulary) must not leave this process on
    other thread counts (it made later in-process results differ from subprocesses')."""
    from pldr.cli import main

    from pydoc_data.topics import topics

    Tokenizer.train([topics[k] for k in sorted(topics)[:60]], 500, str(tmp_path / "big"))
    before = torch.get_num_threads()
    assert main(["serve", "--model", str(model_dir), "--tokenizer", str(tmp_path / "big.model"),
                 "--threads", "1"]) == 2
    assert "pieces but the model only" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_nan_logits_fail_that_request_only(model_dir, tmp_path):
    """A model whose embedding of one token is NaN: a request holding that token gets a 500
    in OpenAI's error shape, and the server goes on serving the others, also in its slot."""
    model = load_model(model_dir)
    with torch.no_grad():
        model.decoder.embedding.weight[50] = float("nan")
    tok = Tokenizer.load(model_dir / "tokenizer.model")
    model.save_pretrained(tmp_path / "model", tokenizer=tok)  # served as "model"
    good = tok.encode("Hello world", eos=False)
    assert 50 not in good
    want = generate(model, [good], 5, temperature=0)[0]
    server = Server(tmp_path / "model", "--max-batch", "1")
    try:
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": "model", "prompt": [7, 50, 9], "max_tokens": 5, "temperature": 0})
            assert r.status_code == 500
            error = r.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "model_error"
            assert "NaN or inf logits" in error["message"]
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": "model", "prompt": good, "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == _continuation(tok, good, want)
        assert httpx.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    finally:
        assert server.stop() is not None


def _engine_process(server_pid: int) -> int:
    """The pid of the server's engine process (a spawned child; the other child is
    multiprocessing's resource tracker)."""
    from pldr.bench.serve_load import _children

    for pid in _children(server_pid):
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"server {server_pid} has no engine process")


def test_the_model_runs_in_its_own_process_and_its_death_is_a_503(model_dir):
    s = Server(model_dir)
    try:
        engine = _engine_process(s.proc.pid)
        ok = httpx.post(s.url + "/v1/completions", timeout=30, json={
            "model": "model", "prompt": [17, 5, 99], "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200"
            time.sleep(0.1)
        r = httpx.post(s.url + "/v1/completions", timeout=30, json={
            "model": "model", "prompt": [17, 5, 99], "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        assert "restart the server" in r.json()["error"]["message"]
    finally:
        assert s.stop() == 0  # the server still drains and exits cleanly


def _start_log(s: Server) -> str:
    """What the server printed from its start to its stop."""
    assert s.stop() == 0
    return s.proc.stdout.read()


def test_a_runs_final_folder_is_served_under_the_runs_name_and_the_start_is_logged(model_dir,
                                                                                  tmp_path):
    import shutil

    final = tmp_path / "my-run" / "final"
    shutil.copytree(model_dir, final)
    (tmp_path / "my-run" / "train_config.json").write_text("{}")
    s = Server(final, "--api-key", KEY)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(s.url + "/v1/models", headers=auth, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["my-run"]
    finally:
        log = _start_log(s)
    line = next(line for line in log.splitlines() if line.startswith("serving "))
    assert "'my-run'" in line and "layout pldr" in line and "float32" in line
    assert f"{s.url}/v1" in line and "API key required" in line


def test_served_model_name_chooses_the_id_and_a_port_directory_says_its_layout(model_dir,
                                                                              tmp_path):
    from pldr.checkpoint.convert import convert_model

    port = convert_model(load_model(model_dir), tmp_path / "port", "hf-port")
    s = Server(port, "--tokenizer", str(model_dir / "tokenizer.model"),
               "--served-model-name", "pldr-small")
    try:
        models = httpx.get(s.url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["pldr-small"]
    finally:
        log = _start_log(s)
    line = next(line for line in log.splitlines() if line.startswith("serving "))
    assert "'pldr-small'" in line and "layout hf-port" in line and "no API key" in line
