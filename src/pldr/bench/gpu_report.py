"""The speed half of `scripts/gpu_check.sh`: the figures that tell whether pldr uses a GPU
well, measured in one process in a few minutes on the 110M shape.

    python -m pldr.bench.gpu_report [--device cuda] [--json FILE]
    python -m pldr.bench.gpu_report --smoke          the same code on the tiny preset (CPU)

It prints one line per figure:

    decode kv_g (PLDR) vs plain SDPA   batch-1 decode tokens/s of the 110M model against its
                                       v510G twin (identity G_LM: plain SDPA attention)
    engine x16 vs x1                   aggregate engine decode tokens/s, 16 requests against 1
    compiled decode vs eager           the decode step under torch.compile (CUDA graphs on
                                       CUDA: mode="reduce-overhead") against eager, batch 1
    train bf16-mixed (and fp32)        tokens/s of one training step (`pldr train --precision`),
                                       eager and compiled
    SDPA kernels                       which scaled_dot_product_attention kernels ran in a
                                       prefill and a decode step (flash, memory-efficient,
                                       cuDNN or math), from the profiler's op names

`--smoke` runs every part on the tiny preset with a few tokens and skips the compiled
measurements (whose compile alone takes minutes on a CPU): it checks the script, not the
machine. Figures from different runs or machines are not comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from .measure import BenchSpec, machine_info, run_one

# aten ops of scaled_dot_product_attention's kernels -> the name the report prints
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend)",
}


def sdpa_kernels(fn: Callable[[], Any]) -> list[str]:
    """The SDPA kernels `fn` ran, by the profiler's op names (one entry per kind)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted({label for op, label in SDPA_KERNELS.items() if op in names})


def kernels_of_model(device: str, preset: str) -> dict[str, list[str]]:
    """The SDPA kernels of a prefill (a 256-token prompt, padded to its right length with
    no pad: the unmasked causal path) and of one cached decode step, on `device`."""
    from ..config import PLDRConfig
    from ..inference.engine import Engine
    from ..model.model import PLDRModel

    torch.manual_seed(0)
    with torch.device(device):
        model = PLDRModel(PLDRConfig.preset(preset)).eval()
    T = min(256, model.config.max_seq_len // 2)
    ids = torch.randint(6, model.config.vocab_size, (1, T), device=device)
    with torch.no_grad():
        prefill = sdpa_kernels(lambda: model(ids))
    engine = Engine(model, max_batch=2, max_len=T + 8)
    engine.submit(ids[0].tolist(), 4, temperature=0, eos_id=-1)
    engine.step()  # admission: prefill and first token
    decode = sdpa_kernels(engine.step)
    return {"prefill": prefill, "decode step": decode}


def specs(device: str, smoke: bool) -> dict[str, BenchSpec]:
    """The measurements of the report, keyed by name."""
    if smoke:  # batch 4 stands in for 16: the point is the code path
        base = BenchSpec(what="decode", model="tiny", prompt_len=4, new_tokens=4, train_batch=1,
                         train_len=16, device=device, repeats=1, threads=1)
    else:
        base = BenchSpec(what="decode", model="pldr-110m", prompt_len=64, new_tokens=128,
                         train_batch=8, train_len=1024, device=device, repeats=3)
    out = {
        "decode kv_g": replace(base),
        "decode kv_g plain SDPA (v510G)": replace(base, variant="v510G"),
        "engine x1": replace(base, what="engine", batch=1),
        "engine x16": replace(base, what="engine", batch=4 if smoke else 16),
        "train fp32": replace(base, what="train"),
        "train bf16-mixed": replace(base, what="train", dtype="bfloat16"),
    }
    if not smoke:
        out["decode kv_g compiled"] = replace(base, compile=True)
        out["train bf16-mixed compiled"] = replace(base, what="train", dtype="bfloat16",
                                                   compile=True)
    return out


RATIOS = (("PLDR decode kv_g / plain SDPA", "decode kv_g", "decode kv_g plain SDPA (v510G)"),
          ("engine x16 / x1", "engine x16", "engine x1"),
          ("compiled decode (CUDA graphs on CUDA) / eager", "decode kv_g compiled",
           "decode kv_g"),
          ("train bf16-mixed / fp32", "train bf16-mixed", "train fp32"),
          ("train bf16-mixed compiled / eager", "train bf16-mixed compiled",
           "train bf16-mixed"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pldr.bench.gpu_report",
                                description="GPU speed figures of pldr (see the module docs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny preset, a few tokens, no compiled runs: checks the script")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; run on a GPU machine or "
              "pass --smoke --device cpu", file=sys.stderr)
        return 2
    info = machine_info()
    print(f"device: {info['cuda'] or info['cpu']} (torch {info['torch']}, "
          f"cpu flags {' '.join(info['cpu_flags'])})", flush=True)
    tokens_per_s: dict[str, float] = {}
    for name, spec in specs(args.device, args.smoke).items():
        t0 = time.perf_counter()
        result = run_one(spec)
        tokens_per_s[name] = result.tokens_per_s
        print(f"{name:34s} {result.tokens_per_s:10.1f} tokens/s  ({spec.model}, "
              f"{time.perf_counter() - t0:.0f} s with warm-up)", flush=True)
    ratios = {label: tokens_per_s[a] / tokens_per_s[b] for label, a, b in RATIOS
              if a in tokens_per_s and b in tokens_per_s}
    for label, value in ratios.items():
        print(f"{label}: {value:.2f}x")
    kernels = kernels_of_model(args.device, "tiny" if args.smoke else "pldr-110m")
    for where, names in kernels.items():
        print(f"SDPA kernel, {where}: {', '.join(names) or 'none found'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "tokens_per_s": tokens_per_s, "ratios": ratios,
                       "sdpa_kernels": kernels, "smoke": args.smoke}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
