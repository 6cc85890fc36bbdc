"""`pldr bench`: speed and peak memory of decoding, the engine, prefill and a training step.

Each measurement runs in a fresh Python process, so its peak RSS (`ru_maxrss`) belongs to it
alone; inside, one warm-up run is followed by `repeats` timed runs and the median is kept.
The method follows the original's CPU baseline (docs/benchmarks.md, How to measure): random
weights (seed 0), random ids, batch 1 decoding of `new_tokens` after a `prompt_len` prompt,
the prefill of a `prefill_len`-token prompt (as generation runs it: into a fresh kv_g
cache, logits of the last position only; the original's baseline timed a full forward with
logits at every position), and one AdamW training step on [train_batch, train_len] tokens
(float32 weights; `dtype="bfloat16"` runs it under bf16 autocast, as `pldr train` does, and
casts the weights to bf16 for decode and prefill).
`engine` measures the aggregate decode throughput of `pldr.Engine` with `batch` running
requests (all admitted and prefilled first, untimed; then `new_tokens - 1` timed steps of
one token each for every request); `compile=True` runs the decode step under torch.compile
(kv modes of `decode`, and `engine`), and the training step's forward and backward (`train`,
as `pldr train --compile`; the warm-up step compiles).
The machine's CPU flags, thread count and load are recorded with the results: compare only
figures from the same run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import PLDRError, import_extra

MEASUREMENTS = ("decode", "prefill", "train", "engine", "gemv", "finetune")
# dtypes a spec may name: the float dtypes, and int8 weights (model/quantize.py) for decoding
BENCH_DTYPES = ("float32", "bfloat16", "int8")
GEMV_ITERS = 10  # matrix-vector products per timed gemv run


@dataclass(frozen=True)
class BenchSpec:
    """One measurement: what to run and on which model."""

    what: str                     # "decode" | "prefill" | "train" | "engine" | "gemv"
    model: str = "pldr-110m"      # a preset name or a model directory
    variant: str | None = None    # override the preset's variant ("v510G" = identity G_LM)
    cache: str = "kv_g"           # decode only
    prompt_len: int = 64
    new_tokens: int = 128
    prefill_len: int = 512
    train_batch: int = 4
    train_len: int = 256
    dtype: str = "float32"        # float32 | bfloat16 | int8 (weights; not for train)
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 3
    batch: int = 1                # engine: running requests
    compile: bool = False         # decode (kv modes), engine, train: torch.compile the step
    activation_checkpointing: bool = False  # train: recompute each decoder layer in backward
    lora_r: int = 0               # finetune: LoRA rank (0: every weight trains)
    lora_targets: str = ""        # finetune: comma-separated layer names ("": the default)


@dataclass
class BenchResult:
    spec: BenchSpec
    seconds: list[float]               # the timed runs
    median_s: float
    tokens_per_s: float
    peak_rss_mb: float
    rss_after_build_mb: float
    extra: dict[str, Any] = field(default_factory=dict)


def model_config(model: str):
    """The PLDRConfig of a bench --model (a preset, or a model directory in our layout or
    the transformers port's) without reading its weights."""
    from pathlib import Path

    from ..checkpoint.hf_port import config_from_port, read_port_config
    from ..config import PLDRConfig

    path = Path(model)
    if path.is_dir():
        port = read_port_config(path)
        if port is not None:
            return config_from_port(port)
    return PLDRConfig.resolve(model, "--model")


def fit_lengths(max_seq_len: int, *, prompt_len: int, new_tokens: int, prefill_len: int,
                train_len: int) -> tuple[dict[str, int], list[str]]:
    """The lengths to measure at, fitted to a model of `max_seq_len` positions, and one note
    per length that changed (naming its flag). A decode or engine run holds the prompt and
    every new token; prefill and a training row hold their own length."""
    fit = dict(prompt_len=prompt_len, new_tokens=new_tokens, prefill_len=prefill_len,
               train_len=train_len)
    if prompt_len + new_tokens > max_seq_len:
        if prompt_len >= max_seq_len:
            fit["prompt_len"] = max(1, max_seq_len // 4)
        fit["new_tokens"] = max_seq_len - fit["prompt_len"]
    fit["prefill_len"] = min(prefill_len, max_seq_len)
    fit["train_len"] = min(train_len, max_seq_len)
    given = dict(prompt_len=prompt_len, new_tokens=new_tokens, prefill_len=prefill_len,
                 train_len=train_len)
    notes = [f"--{k.replace('_', '-')} {given[k]} -> {v}" for k, v in fit.items() if v != given[k]]
    return fit, notes


def machine_info() -> dict[str, Any]:
    """CPU model, the SIMD flags that matter for torch, threads, load and versions, and
    whether few-row float32 products are turned round here (model/linear.py), which moves
    batched decoding figures."""
    from ..devices import cpu_flags, cpuinfo_field
    from ..model.linear import WEIGHT_LEFT_PAYS

    flags, model = cpu_flags(), cpuinfo_field("model name") or platform.processor()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
              "amx_int8")
    return {
        "cpu": model, "cpu_flags": [f for f in wanted if f in flags], "nproc": os.cpu_count(),
        "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "few_row_products_turned": WEIGHT_LEFT_PAYS,
    }


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def _build_model(spec: BenchSpec):
    """The benchmarked model: random weights from seed 0, or a saved directory, prepared for
    decoding as `pldr generate` prepares it (`for_decoding`: int8 quantised, bf16 packed or,
    on a CPU without native bf16, float32 with a warning)."""
    from ..checkpoint.load import load_model
    from ..config import PLDRConfig
    from ..devices import load_dtype, parse_dtype
    from ..model.model import PLDRModel
    from ..model.quantize import for_decoding

    if spec.dtype == "int8" and spec.what == "train":
        raise PLDRError("int8 weights are for inference; train with float32 or bfloat16")
    # training keeps float32 weights and runs bf16 under autocast, as `pldr train --dtype`
    train = spec.what in ("train", "finetune")
    dtype = torch.float32 if train else parse_dtype(load_dtype(spec.dtype, spec.device))
    if os.path.isdir(spec.model):
        model = load_model(spec.model, device=spec.device, dtype=dtype)
    else:
        config = PLDRConfig.resolve(spec.model, "--model")
        if spec.variant:
            config = config.replace(variant=spec.variant)
        torch.manual_seed(0)
        with torch.device(spec.device):
            model = PLDRModel(config)
        model = model.to(dtype=dtype).eval()
    return model if train else for_decoding(model, spec.dtype)


def decode_bytes_per_token(model: torch.nn.Module, max_len: int) -> int:
    """Bytes one batch-1 kv_g decode step reads: every weight except the embedding table (one
    row) and the metric learner (the G-cache fixes its output), plus the KV buffers of
    `max_len` positions and the cached G_LM, at the model's dtype."""
    from ..model.quantize import module_bytes

    cfg = model.config
    weights = 0
    for name, m in model.named_modules():
        if "reslayerAs" in name or "plgatt_layer" in name:
            continue
        if name == "decoder.embedding":
            weights += m.weight.shape[-1] * m.weight.element_size()
            continue
        fixed_G = dict(m.named_buffers(recurse=False)).get("G_LM")   # counted as the G cache
        weights += module_bytes(m) - (0 if fixed_G is None else fixed_G.nbytes)
    elem = model.decoder.embedding.weight.element_size()
    kv = 2 * cfg.num_layers * max_len * cfg.d_model * elem          # k and v, [L, 1, H, S, dk]
    G = cfg.num_layers * cfg.num_heads * cfg.dk * cfg.dk * elem     # G_LM, [L, 1, H, dk, dk]
    return weights + kv + G


def _G_bytes(model) -> int:
    """Bytes of the cached G_LM of one slot (what `decode_bytes_per_token` adds for it)."""
    c = model.config
    return c.num_layers * c.num_heads * c.dk * c.dk * model.decoder.embedding.weight.element_size()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(spec: BenchSpec) -> BenchResult:
    """Run one measurement in this process (use `measure` to get a fresh process)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = _build_model(spec)
    rss_built = _current_rss_mb()
    V, gen = model.config.vocab_size, torch.Generator().manual_seed(1)
    ids = lambda *shape: torch.randint(6, V, shape, generator=gen).to(spec.device)  # noqa: E731
    from ..devices import parse_dtype

    if spec.what == "decode":
        from ..inference.generate import generate

        prompt = ids(1, spec.prompt_len)

        kw = dict(cache=spec.cache, temperature=0, eos_id=-1, compile=spec.compile)

        def job():
            generate(model, prompt, spec.new_tokens, **kw)
        # a compiled step is compiled for its cache length: warm up at the timed length
        warm = lambda: generate(model, prompt, spec.new_tokens if spec.compile else 16, **kw)  # noqa
        tokens = spec.new_tokens
    elif spec.what == "engine":
        from ..inference.engine import Engine

        engine = Engine(model, max_batch=spec.batch, max_len=spec.prompt_len + spec.new_tokens,
                        cache=spec.cache, compile=spec.compile)
        prompts = [ids(spec.prompt_len).tolist() for _ in range(spec.batch)]
        timed = {}

        def run_engine(n: int) -> None:
            for p in prompts:
                engine.submit(p, n, temperature=0, eos_id=-1)
            engine.step()                  # admission: every prefill and first token
            _sync(spec.device)
            t0 = time.perf_counter()
            engine.run()                   # n - 1 decode steps over `batch` requests
            _sync(spec.device)
            timed["s"] = time.perf_counter() - t0

        def job():
            run_engine(spec.new_tokens)
        warm = lambda: run_engine(4)  # noqa: E731
        tokens = spec.batch * (spec.new_tokens - 1)
    elif spec.what == "prefill":
        from ..inference.generate import prefill, start

        rows = ids(1, spec.prefill_len).tolist()

        def job():  # what generation does with a prompt: fill a fresh kv_g cache, last logits
            with torch.no_grad():
                prefill(model, start(model, rows, "kv_g", 1))
        warm, tokens = job, spec.prefill_len
    elif spec.what == "gemv":
        # a float32 matrix as large as the weights a decode step reads, times a vector
        per_token = decode_bytes_per_token(model, spec.prompt_len + spec.new_tokens)
        cache_free = decode_bytes_per_token(model, 0) - _G_bytes(model)
        cols = model.config.d_model
        rows = max(1, cache_free // 4 // cols)
        del model
        W = torch.randn(rows, cols, device=spec.device)                  # [R, C]
        v = torch.randn(cols, device=spec.device)                        # [C]

        def job():
            for _ in range(GEMV_ITERS):
                torch.mv(W, v)
        warm, tokens = job, GEMV_ITERS
    elif spec.what == "train":
        from ..training.step import forward_backward, make_optimizer, update

        model.train()
        if spec.activation_checkpointing:
            model.set_activation_checkpointing(True)
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
        batch = ids(spec.train_batch, spec.train_len + 1)
        amp = None if parse_dtype(spec.dtype) == torch.float32 else torch.bfloat16
        forward = torch.compile(model) if spec.compile else None

        def job():  # the step of `pldr train` (training/step.py), as the original's: no DAG
            lo, _ = forward_backward(model, batch, pad_id=model.config.pad_id, amp_dtype=amp,
                                     pads=False, forward=forward)  # random ids: no pads
            update(model, opt, lr=1e-3)
            lo.loss.item()
        warm, tokens = job, spec.train_batch * spec.train_len
    elif spec.what == "finetune":
        job, warm, tokens = _finetune_job(model, spec, ids)
        del model  # the head model holds a copy of the decoder
    else:
        raise PLDRError(f"unknown measurement {spec.what!r}; choose from {', '.join(MEASUREMENTS)}")
    warm()
    _sync(spec.device)
    times = []
    for _ in range(spec.repeats):
        t0 = time.perf_counter()
        job()
        _sync(spec.device)
        times.append(time.perf_counter() - t0)
        if spec.what == "engine":
            times[-1] = timed["s"]  # the decode steps only
    med = statistics.median(times)
    extra = {}
    if spec.what == "gemv":
        extra.update(gemv_gb_s=W.numel() * W.element_size() * GEMV_ITERS / med / 1e9,
                     gemv_bytes=W.numel() * W.element_size(), decode_bytes_per_token=per_token)
    if spec.device.startswith("cuda"):
        extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return BenchResult(spec=spec, seconds=times, median_s=med, tokens_per_s=tokens / med,
                       peak_rss_mb=_rss_mb(), rss_after_build_mb=rss_built, extra=extra)


def _finetune_job(model, spec: BenchSpec, ids):
    """A step of `pldr finetune --task sequence-classification` on [train_batch, train_len]
    tokens: the model's decoder under a new 2-label head (LoRA of rank `lora_r` on the
    default targets, or every weight), the task's loss, backward, norm clipping at 1.0 and
    AdamW over the trainable parameters (pldr.finetune's step without its bookkeeping)."""
    from ..checkpoint.adapters import add_lora, attach_head
    from ..finetune.config import DEFAULT_LORA_TARGETS
    from ..finetune.evaluate import batch_loss
    from ..model.heads import PLDRForSequenceClassification
    from ..training.step import ADAMW_BETAS, ADAMW_EPS

    import_extra("peft", "finetune", "pldr bench --what finetune")  # both runs carry its RSS
    torch.manual_seed(0)
    head = attach_head(model, PLDRForSequenceClassification, model.config.replace(num_labels=2))
    if spec.lora_r:
        targets = spec.lora_targets.split(",") if spec.lora_targets else DEFAULT_LORA_TARGETS
        add_lora(head, spec.lora_r, 2.0 * spec.lora_r, 0.0, targets, ("score",))
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=7e-5, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                            fused=spec.device.split(":")[0] in ("cpu", "cuda"))
    x = ids(spec.train_batch, spec.train_len)
    batch = {"ids": x, "attention_mask": torch.ones_like(x),
             "labels": torch.arange(spec.train_batch, device=x.device) % 2}
    amp = None if spec.dtype == "float32" else torch.bfloat16

    def job():
        loss, _, _ = batch_loss("sequence-classification", head, batch, amp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return job, job, spec.train_batch * spec.train_len


def measure(spec: BenchSpec) -> BenchResult:
    """Run `spec` in a fresh process and return its result."""
    cmd = [sys.executable, "-m", "pldr.bench.measure", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PLDRError(f"benchmark {spec.what} ({spec.cache if spec.what == 'decode' else ''}) "
                        f"failed: {tail}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["spec"] = BenchSpec(**data["spec"])
    return BenchResult(**data)


def format_table(results: list[BenchResult]) -> str:
    """A plain-text table of the results."""
    rows = [("measurement", "model", "median s", "tokens/s", "peak RSS MB")]
    for r in results:
        s = r.spec
        name = f"{s.what} {s.cache}" if s.what == "decode" else s.what
        if s.what == "engine":
            name = f"engine {s.cache} x{s.batch}"
        if s.compile:
            name += " compiled"
        if s.activation_checkpointing:
            name += " checkpointed"
        if s.what == "finetune":
            name += f" lora r{s.lora_r}" if s.lora_r else " full"
            name += f" [{s.lora_targets}]" if s.lora_targets else ""
        model = s.model + (f" ({s.variant})" if s.variant else "") + f" {s.dtype}"
        rows.append((name, model, f"{r.median_s:.3f}", f"{r.tokens_per_s:.1f}",
                     f"{r.peak_rss_mb:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def summarise(results: list[BenchResult]) -> dict[str, float]:
    """Ratios within one run: the engine's aggregate decode throughput with N requests over
    one request, compiled over eager (decode and engine) and activation-checkpointed training
    over plain (tokens/s and peak RSS), keyed by what they compare."""
    def key(r: BenchResult) -> tuple:
        s = r.spec
        return (s.what, s.cache, s.variant, s.dtype, s.batch if s.what == "engine" else 1,
                s.compile)
    by = {key(r): r.tokens_per_s for r in results if not r.spec.activation_checkpointing}
    out = {}
    plain = {key(r): r for r in results if r.spec.what == "train"
             and not r.spec.activation_checkpointing}
    for r in results:
        p = plain.get(key(r))
        if r.spec.activation_checkpointing and p is not None:
            tag = "train" + (f" {r.spec.variant}" if r.spec.variant else "") + f" {r.spec.dtype}"
            out[f"{tag} checkpointed / plain tokens/s"] = r.tokens_per_s / p.tokens_per_s
            out[f"{tag} checkpointed / plain peak RSS"] = r.peak_rss_mb / p.peak_rss_mb
    full = {(r.spec.variant, r.spec.dtype): r for r in results
            if r.spec.what == "finetune" and not r.spec.lora_r}
    for r in results:
        f = full.get((r.spec.variant, r.spec.dtype))
        if r.spec.what == "finetune" and r.spec.lora_r and f is not None:
            tag = (f"finetune lora r{r.spec.lora_r}"
                   + (f" [{r.spec.lora_targets}]" if r.spec.lora_targets else "")
                   + f" {r.spec.dtype}")
            out[f"{tag} / full tokens/s"] = r.tokens_per_s / f.tokens_per_s
            out[f"{tag} / full peak RSS"] = r.peak_rss_mb / f.peak_rss_mb
    by = {k: v for k, v in by.items() if k[0] != "finetune"}
    for (what, cache, variant, dtype, batch, comp), tps in by.items():
        tag = f"{what} {cache}" + (f" {variant}" if variant else "") + f" {dtype}"
        one = by.get((what, cache, variant, dtype, 1, comp))
        if what == "engine" and batch > 1 and one:
            out[f"{tag} x{batch} / x1" + (" compiled" if comp else "")] = tps / one
        eager = by.get((what, cache, variant, dtype, batch, False))
        if comp and eager:
            out[f"{tag}" + (f" x{batch}" if what == "engine" else "") + " compiled / eager"] = tps / eager
    return out


if __name__ == "__main__":  # one measurement in a fresh process: argv[1] is a BenchSpec as JSON
    result = run_one(BenchSpec(**json.loads(sys.argv[1])))
    print(json.dumps(asdict(result)))
