"""`pldr bench --what serve`: a load test of `pldr serve` on this machine.

A model with random weights (seed 0) of the chosen shape is saved with a tokenizer of the
same vocabulary size (trained on the built-in corpus; pieces the corpus cannot fill are
placeholder symbols), served by a `pldr serve` subprocess on 127.0.0.1, and sent a fixed
number of streamed greedy requests of random prompts by 1 and by N concurrent clients. Per
run: generated tokens per second over the wall time, time to first token (p50, p99, seen by
the client), failed requests; and the server's RSS after 100 and after 1,000 requests (memory
that grows per request would show there).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PLDRError


@dataclass(frozen=True)
class ServeBenchSpec:
    model: str = "tiny"            # a preset
    clients: tuple[int, ...] = (1, 16)
    requests: int = 64             # per client count
    prompt_len: int = 32
    max_tokens: int = 32
    rss_requests: tuple[int, ...] = (100, 1000)  # tiny only: measured on the tiny shape
    max_batch: int = 16
    threads: int | None = None     # the server's torch threads (None: its default)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(preset: str, root: Path) -> Path:
    """Random weights of `preset` and a tokenizer with exactly its vocabulary size."""
    import torch
    from pydoc_data.topics import topics

    from ..config import PLDRConfig
    from ..data.tokenizer import Tokenizer
    from ..model import PLDRModel

    config = PLDRConfig.preset(preset)
    learnable = min(config.vocab_size, 4096)  # what the built-in corpus can fill
    fillers = [f"<bench_{i}>" for i in range(config.vocab_size - learnable)]
    texts = [topics[k] for k in sorted(topics)]
    kwargs = {"user_defined_symbols": fillers} if fillers else {}
    tok = Tokenizer.train(texts, config.vocab_size, str(root / "tok"), **kwargs)
    torch.manual_seed(0)
    PLDRModel(config).save_pretrained(root / "model", tokenizer=tok)
    return root / "model"


def _rss_mb(pid: int) -> float:
    """Resident memory of the server: its process and its children (the engine process)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


class _Server:
    def __init__(self, model_dir: Path, max_batch: int, threads: int | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pldr", "serve", "--model", str(model_dir), "--port",
             str(self.port), "--max-batch", str(max_batch), "--max-queue", "100000"]
            + ([] if threads is None else ["--threads", str(threads)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet (URLError is an OSError)
                time.sleep(0.5)
        self.stop()
        raise PLDRError("the benchmark's server did not start within 5 minutes")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one_request(port: int, prompt: list[int], max_tokens: int) -> tuple[int, float | None]:
    """One streamed greedy completion over a fresh connection: (tokens generated, seconds to
    the first token), or (-1, None) on failure.

    A bare HTTP/1.1 client on asyncio streams, so that the load generator, which shares the
    machine's cores with the server, spends little per token: it reads the chunked SSE body
    line by line, notes when the first text chunk arrives and parses only the usage chunk."""
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    start = time.perf_counter()
    first, tokens = None, -1
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return -1, None
    try:
        writer.write(head + body)
        status = await reader.readline()
        if status.split(b" ", 2)[1:2] != [b"200"]:
            return -1, None
        while await reader.readline() not in (b"\r\n", b""):
            pass  # the headers: uvicorn streams with chunked transfer encoding
        async for line in _chunked_lines(reader):
            if not line.startswith(b"data: {"):
                continue
            if b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
                    continue
            if first is None:
                first = time.perf_counter() - start
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return -1, None
    finally:
        writer.close()
    return tokens, first


async def _chunked_lines(reader: asyncio.StreamReader):
    """The lines of a chunked HTTP body, as bytes without their line end."""
    pending = b""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            break
        pending += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


def _load(server: _Server, clients: int, prompts: list[list[int]],
          max_tokens: int) -> dict[str, Any]:
    """`clients` concurrent clients, each sending its next request when its last one ended,
    until `prompts` are all answered."""
    async def run() -> list[tuple[int, float | None]]:
        todo = iter(enumerate(prompts))
        results: list[tuple[int, float | None]] = [(-1, None)] * len(prompts)

        async def client() -> None:
            for i, prompt in todo:
                results[i] = await _one_request(server.port, prompt, max_tokens)

        await asyncio.gather(*(client() for _ in range(clients)))
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    ok = [(n, t) for n, t in results if n >= 0 and t is not None]
    ttft = sorted(t for _, t in ok)
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(prompts), "failed": len(results) - len(ok),
            "tokens": sum(n for n, _ in ok), "wall_s": wall,
            "tok_s": sum(n for n, _ in ok) / wall, "ttft_p50_s": statistics.median(ttft)
            if ttft else float("nan"), "ttft_p99_s": pick(0.99)}


def measure_serve(spec: ServeBenchSpec, progress=print) -> dict[str, Any]:
    """Run the load test; returns the figures as a dict (see the module docstring)."""
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="pldr-bench-serve-") as tmp:
        progress(f"serve {spec.model}: building a random model and its tokenizer")
        model_dir = _model_dir(spec.model, Path(tmp))
        server = _Server(model_dir, spec.max_batch, spec.threads)
        try:
            vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
            draw = lambda n: [[rng.randrange(6, vocab) for _ in range(spec.prompt_len)]  # noqa: E731
                              for _ in range(n)]
            _load(server, 1, draw(2), spec.max_tokens)  # warm-up
            runs = []
            for clients in spec.clients:
                progress(f"serve {spec.model}: {spec.requests} requests, {clients} clients")
                runs.append(_load(server, clients, draw(spec.requests), spec.max_tokens))
            out: dict[str, Any] = {"model": spec.model, "runs": runs}
            by = {r["clients"]: r for r in runs}
            if 1 in by and max(by) > 1:
                out["speedup"] = by[max(by)]["tok_s"] / by[1]["tok_s"]
            if spec.rss_requests:
                done, rss = 0, {}
                for target in spec.rss_requests:
                    progress(f"serve {spec.model}: RSS after {target} requests")
                    while done < target:
                        n = min(target - done, 256)
                        _load(server, spec.max_batch, draw(n), 8)
                        done += n
                    rss[target] = _rss_mb(server.proc.pid)
                out["rss_mb"] = rss
                first, last = spec.rss_requests[0], spec.rss_requests[-1]
                out["rss_growth"] = rss[last] / rss[first] - 1
            return out
        finally:
            server.stop()


def format_serve(result: dict[str, Any]) -> str:
    lines = [f"serve {result['model']}:  clients  requests  failed  tok/s    TTFT p50  p99"]
    for r in result["runs"]:
        lines.append(f"  {r['clients']:>22}  {r['requests']:>8}  {r['failed']:>6}  "
                     f"{r['tok_s']:>7.1f}  {r['ttft_p50_s']:>7.3f}s  {r['ttft_p99_s']:.3f}s")
    if "speedup" in result:
        lines.append(f"  aggregate tok/s at {max(r['clients'] for r in result['runs'])} "
                     f"clients / 1 client: {result['speedup']:.2f}x")
    if "rss_mb" in result:
        rss = result["rss_mb"]
        lines.append("  server RSS: " + ", ".join(f"{v:.0f} MB after {k}" for k, v in rss.items())
                     + f" ({result['rss_growth'] * 100:+.1f}%)")
    return "\n".join(lines)
