"""`pldr bench`."""

from __future__ import annotations

import argparse

from ..errors import PLDRError
from .common import model_rule


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill/training speed and peak memory",
                       description="Each measurement runs in a fresh process (median of "
                       "--repeats after a warm-up); CPU flags and load are recorded. Compare "
                       "figures only within one run.")
    model_rule(p, presets=True)
    p.add_argument("--model", default="pldr-110m",
                   help="a model directory (its shape and weights), else a preset name (a "
                   "fresh random model of that shape)")
    p.add_argument("--what", default="decode,prefill,train",
                   help="comma-separated: decode, prefill, train, engine (continuous batching), "
                   "serve (a load test of pldr serve; needs the serve extra), finetune (a "
                   "sequence-classification step, every weight against LoRA --lora-r)")
    p.add_argument("--batch", default="1,16",
                   help="engine: comma-separated numbers of running requests (default 1,16)")
    p.add_argument("--compile", action="store_true",
                   help="also measure decode (kv modes), engine and train (the forward and "
                   "backward, as `pldr train --compile`) under torch.compile")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="also measure train with each decoder layer recomputed in backward "
                   "(less memory, more compute; `pldr train --activation-checkpointing`)")
    p.add_argument("--cache", default="kv_g,kv_only,g_only,no_cache",
                   help="comma-separated cache modes for decode")
    p.add_argument("--compare-G", action="store_true",
                   help="also measure the v510G (identity G_LM, plain SDPA) twin of a preset")
    p.add_argument("--suite", action="store_true",
                   help="measure the named figures of the README's Benchmarks section "
                   "(decode modes, the plain-SDPA baseline, batch 16, bf16, int8, prefill, "
                   "training, gemv bandwidth and the roofline fraction); --json FILE gets "
                   "them as flat keys")
    p.add_argument("--quick", action="store_true", help="one timed repeat per measurement")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated: float32, bfloat16, int8 (int8 weights: decode, "
                   "prefill and engine on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8,
                   help="finetune: the LoRA rank measured beside full fine-tuning (default 8)")
    p.add_argument("--lora-targets", action="append", default=None, metavar="NAMES",
                   help="finetune: comma-separated linear layers that get adapters (default: "
                        "pldr finetune's); repeat to measure several sets in one run")
    p.add_argument("--clients", default="1,16",
                   help="serve: comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=64, help="serve: requests per client count")
    p.add_argument("--rss-requests", default="100,1000",
                   help="serve: read the server's RSS after these many requests ('' skips)")
    p.add_argument("--json", metavar="FILE", help="also write machine info and results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    from ..bench.measure import (
        BENCH_DTYPES,
        MEASUREMENTS,
        BenchSpec,
        format_table,
        machine_info,
        measure,
        summarise,
    )
    from ..config import PRESETS
    from ..inference.generate import CACHE_MODES

    whats = [w for w in args.what.split(",") if w]
    serve = "serve" in whats
    whats = [w for w in whats if w != "serve"]
    caches = [c for c in args.cache.split(",") if c]
    dtypes = [d for d in args.dtype.split(",") if d]
    for w in whats:
        if w not in MEASUREMENTS:
            raise PLDRError(f"--what {w!r} is unknown; choose from "
                            f"{', '.join(MEASUREMENTS + ('serve',))}")
    for c in caches:
        if c not in CACHE_MODES:
            raise PLDRError(f"--cache {c!r} is unknown; choose from {', '.join(CACHE_MODES)}")
    from ..devices import resolve_device

    resolve_device(args.device)  # an unknown or absent device fails here, in one line
    for d in dtypes:
        if d not in BENCH_DTYPES:
            raise PLDRError(f"--dtype {d!r} is unknown; choose from {', '.join(BENCH_DTYPES)}")
    if "int8" in dtypes and not args.suite and set(whats) & {"train", "gemv"}:
        raise PLDRError("--dtype int8 (int8 weights) is for decode, prefill and engine, "
                        "not train or gemv; drop those from --what")
    if "int8" in dtypes and not args.device.startswith("cpu"):
        raise PLDRError("--dtype int8 runs on CPU only; use --device cpu")
    if not Path(args.model).is_dir() and args.model not in PRESETS:
        raise PLDRError(f"--model {args.model!r} is a file; pldr bench takes a model directory "
                        f"or a preset ({', '.join(PRESETS)})")
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise PLDRError(f"--batch expects comma-separated integers like 1,16, got {args.batch!r}") from None
    if not batches or min(batches) < 1:
        raise PLDRError("--batch needs integers >= 1")
    if args.repeats < 1:
        raise PLDRError("--repeats must be >= 1")
    if args.lora_r < 1:
        raise PLDRError("--lora-r must be >= 1")
    if args.quick:
        args.repeats = 1
    if args.json:  # find out now, not after minutes of measuring
        target = Path(args.json)
        parent = target.parent if str(target.parent) else Path(".")
        if target.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise PLDRError(f"--json {args.json!r} cannot be written (no such folder, a "
                            "folder itself, or no permission); choose another path")
    _fit_lengths(args)
    if args.suite:
        return _suite(args)
    variants: list[str | None] = [None] + (["v510G"] if args.compare_G else [])
    common = dict(model=args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  prefill_len=args.prefill_len, train_batch=args.train_batch,
                  train_len=args.train_len, device=args.device, threads=args.threads,
                  repeats=args.repeats)
    specs = []
    for dtype in dtypes:
        for variant in variants:
            for w in whats:
                for c in (caches if w == "decode" else ["kv_g"]):
                    if variant == "v510G" and c in ("g_only",):
                        continue  # no G-cache in v510G: same as no_cache
                    kv = c in ("kv_g", "kv_only")
                    for comp in ([False, True] if args.compile and kv
                                 and w in ("decode", "engine", "train") else [False]):
                        for b in (batches if w == "engine" else [1]):
                            for ac in ([False, True] if args.activation_checkpointing
                                       and w == "train" else [False]):
                                for r, t in (_lora_runs(args) if w == "finetune"
                                             else [(0, "")]):
                                    specs.append(BenchSpec(
                                        what=w, cache=c, variant=variant, dtype=dtype, batch=b,
                                        compile=comp, activation_checkpointing=ac, lora_r=r,
                                        lora_targets=t, **common))
    info = machine_info()
    print(f"cpu: {info['cpu']} flags: {' '.join(info['cpu_flags'])} nproc: {info['nproc']} "
          f"torch {info['torch']} threads {info['torch_threads']} load {info['loadavg']}",
          flush=True)
    serve_result = _serve_bench(args) if serve else None
    results = []
    if specs:
        print(_progress_header(args, len(specs)), flush=True)
    for i, spec in enumerate(specs, 1):
        results.append(measure(spec))
        print(f"[{i}/{len(specs)}] {format_table(results[-1:]).splitlines()[-1]}", flush=True)
    if results:
        print()
        print(format_table(results))
    ratios = summarise(results)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "machine_after": machine_info(),
             "results": [asdict(r) for r in results], "ratios": ratios,
             "serve": serve_result}, indent=2))
    return 0


def _lora_runs(args: argparse.Namespace) -> list[tuple[int, str]]:
    """The finetune measurements: every weight (rank 0), then LoRA of `--lora-r` on each
    `--lora-targets` set ("" is pldr finetune's default set)."""
    sets = [",".join(t.strip() for t in s.split(",") if t.strip()) for s in args.lora_targets or [""]]
    return [(0, "")] + [(args.lora_r, t) for t in sets]


def _fit_lengths(args: argparse.Namespace) -> None:
    """Fit --prompt-len/--new-tokens, --prefill-len and --train-len to the model's
    max_seq_len (a tiny model has 256 positions, the defaults ask for 512), saying so."""
    from ..bench.measure import fit_lengths, model_config

    max_len = model_config(args.model).max_seq_len
    fit, notes = fit_lengths(max_len, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             prefill_len=args.prefill_len, train_len=args.train_len)
    for name, value in fit.items():
        setattr(args, name, value)
    if notes:
        print(f"note: {args.model} has max_seq_len {max_len}, so the lengths are fitted to it: "
              f"{', '.join(notes)}", flush=True)
    args.max_seq_len = max_len


def _progress_header(args: argparse.Namespace, count: int) -> str:
    """The line before the rows: how many measurements, of what, at which lengths."""
    return (f"measuring {count} figure(s) on {args.model} (max_seq_len {args.max_seq_len}), each "
            f"in a fresh process, median of {args.repeats} after a warm-up: prompt "
            f"{args.prompt_len} + {args.new_tokens} new tokens, prefill {args.prefill_len}, "
            f"train {args.train_batch} x {args.train_len}")


def _serve_bench(args: argparse.Namespace) -> dict:
    from ..bench.serve_load import ServeBenchSpec, format_serve, measure_serve
    from ..config import PRESETS

    if args.model not in PRESETS:
        raise PLDRError(f"--what serve measures a preset shape; --model {args.model!r} is not "
                        f"one of {', '.join(PRESETS)}")
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c)
        rss = tuple(int(c) for c in args.rss_requests.split(",") if c)
    except ValueError:
        raise PLDRError("--clients and --rss-requests take comma-separated integers") from None
    if not clients or min(clients) < 1 or args.requests < 1 or (rss and min(rss) < 1):
        raise PLDRError("--clients, --requests and --rss-requests must be positive")
    spec = ServeBenchSpec(model=args.model, clients=clients, requests=args.requests,
                          prompt_len=args.prompt_len, max_tokens=min(args.new_tokens, 64),
                          rss_requests=rss, threads=args.threads)
    result = measure_serve(spec, progress=lambda m: print(m, flush=True))
    print(format_serve(result), flush=True)
    return result


def _suite(args: argparse.Namespace) -> int:
    """`--suite`: every named figure (bench/suite.py), printed and written as flat JSON keys."""
    import json
    from dataclasses import asdict

    from ..bench.measure import BenchSpec
    from ..bench.suite import ratios, run_suite, suite_keys
    from ..files import atomic_write_text

    base = BenchSpec(what="decode", model=args.model, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, prefill_len=args.prefill_len,
                     train_batch=args.train_batch, train_len=args.train_len,
                     device=args.device, threads=args.threads, repeats=args.repeats)
    print(_progress_header(args, len(suite_keys(base.prefill_len))), flush=True)
    out = run_suite(base, progress=lambda m: print(m, flush=True))
    info = out["machine"]
    print(f"cpu: {info['cpu']} flags: {' '.join(info['cpu_flags'])} threads "
          f"{info['threads']} torch {info['torch']} gpu {info['cuda']}")
    found = ratios(out["figures"])
    for name, value in found.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {**out["figures"], "machine": info, "ratios": found, "spec": asdict(base),
             "results": {k: asdict(r) for k, r in out["results"].items()}}, indent=2))
    return 0
