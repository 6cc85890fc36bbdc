"""`pldr serve` against a real uvicorn server on 127.0.0.1 (a free port), with the official
`openai` client and raw HTTP. Every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the maintained httpx fork that openai and huggingface_hub use
import openai
import pytest
import torch

from pldr import PLDRConfig, PLDRModel, generate, load_model
from pldr.data.tokenizer import Tokenizer

KEY = "test-key-123"
PROMPTS = ["The class", "Hello world", "import os", "def f(x):", "A list of", "Python is",
           "The function returns", "for i in range"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.port = _free_port()
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


def _alone(reference, prompt: str, n: int, **kw) -> str:
    model, tok = reference
    ids = generate(model, [tok.encode(prompt, eos=False)], n, **kw)[0]
    return tok.decode(ids), ids


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
    ({"model": "model", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "model", "prompt": "hi", "logprobs": 5}, 400, "logprobs"),
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
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
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
    s = Server(model_dir, "--api-key", KEY, "--max-batch", "1", "--max-queue", "1")
    try:
        url = s.url + "/v1/completions"
        body = {"model": "model", "prompt": "The class", "max_tokens": 4}
        assert _assert_error_shape(httpx.post(url, json=body, timeout=30), 401)["code"] \
            == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        _assert_error_shape(httpx.post(url, json=body, headers=bad, timeout=30), 401)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(url, json=body, headers=auth, timeout=60).status_code == 200
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200  # no key needed

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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error:") for e in err)


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
            assert r.json()["choices"][0]["text"] == tok.decode(want)
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
