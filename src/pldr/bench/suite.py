"""`pldr bench --suite`: the named figures of issue 15, one fresh process per measurement.

Each key is one `BenchSpec` (measure.py runs it in its own process: median of its repeats
after a warm-up), except three figures derived from them and the model's shape:
- `gemv_gb_s`: the bandwidth a matrix-vector product reaches on a float32 matrix as large as
  the weights one decode step reads (the memory limit of batch-1 decoding on this machine);
- `decode_bytes_per_token`: those weight bytes plus the KV and G cache bytes a kv_g step reads
  (the full fixed-size KV buffers, which a static-shape step attends over with a mask);
- `decode_roofline_fraction`: decode_kv_g_tok_s x decode_bytes_per_token / gemv bandwidth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from .measure import BenchResult, BenchSpec, decode_bytes_per_token, machine_info, measure

# the prefill figure's key names the length that ran: prefill512_s at the default length
PREFILL_KEY = "prefill{prefill_len}_s"
# key -> what to measure (overrides of the base spec) and which figure of the result to keep
SUITE: dict[str, tuple[dict[str, Any], str]] = {
    "decode_kv_g_tok_s": (dict(what="decode", cache="kv_g"), "tokens_per_s"),
    "decode_kv_only_tok_s": (dict(what="decode", cache="kv_only"), "tokens_per_s"),
    "decode_g_only_tok_s": (dict(what="decode", cache="g_only"), "tokens_per_s"),
    "decode_no_cache_tok_s": (dict(what="decode", cache="no_cache"), "tokens_per_s"),
    "decode_sdpa_baseline_tok_s": (dict(what="decode", cache="kv_only", variant="v510G"),
                                   "tokens_per_s"),
    "decode_sdpa_baseline_no_cache_tok_s": (dict(what="decode", cache="no_cache",
                                                 variant="v510G"), "tokens_per_s"),
    "decode_batch16_tok_s": (dict(what="engine", cache="kv_g", batch=16), "tokens_per_s"),
    "decode_kv_g_bf16_tok_s": (dict(what="decode", cache="kv_g", dtype="bfloat16"),
                               "tokens_per_s"),
    "decode_kv_g_int8_tok_s": (dict(what="decode", cache="kv_g", dtype="int8"), "tokens_per_s"),
    PREFILL_KEY: (dict(what="prefill"), "median_s"),
    "train_tok_s": (dict(what="train"), "tokens_per_s"),
    "train_bf16_tok_s": (dict(what="train", dtype="bfloat16"), "tokens_per_s"),
    "train_peak_rss_mb": (dict(what="train"), "peak_rss_mb"),
    "gemv_gb_s": (dict(what="gemv"), "gemv_gb_s"),
}
DERIVED = ("decode_bytes_per_token", "decode_roofline_fraction")


def suite_keys(prefill_len: int = 512) -> tuple[str, ...]:
    """The keys a suite run at this prefill length writes (`prefill512_s` only for 512)."""
    return tuple(k.format(prefill_len=prefill_len) for k in SUITE) + DERIVED


KEYS = suite_keys()  # at the default lengths


def run_suite(base: BenchSpec, progress: Callable[[str], None] = lambda m: None
              ) -> dict[str, Any]:
    """Every key of `suite_keys(base.prefill_len)` for the model of `base` (its lengths,
    device, threads, repeats), with the machine it ran on and each measurement's full
    result."""
    figures: dict[str, float] = {}
    results: dict[str, BenchResult] = {}
    done: dict[BenchSpec, BenchResult] = {}   # train_tok_s and train_peak_rss_mb share a run
    for template, (overrides, field_name) in SUITE.items():
        key = template.format(prefill_len=base.prefill_len)
        spec = replace(base, **overrides)
        if spec not in done:
            done[spec] = measure(spec)
        result = done[spec]
        results[key] = result
        figures[key] = (result.extra[field_name] if field_name not in ("tokens_per_s", "median_s",
                        "peak_rss_mb") else getattr(result, field_name))
        progress(f"{key}: {figures[key]:.4g}")
    gemv = results["gemv_gb_s"].extra
    figures["decode_bytes_per_token"] = gemv["decode_bytes_per_token"]
    figures["decode_roofline_fraction"] = (figures["decode_kv_g_tok_s"]
                                           * figures["decode_bytes_per_token"]
                                           / (figures["gemv_gb_s"] * 1e9))
    progress(f"decode_bytes_per_token: {figures['decode_bytes_per_token']:.4g}")
    progress(f"decode_roofline_fraction: {figures['decode_roofline_fraction']:.3f}")
    machine = machine_info()
    machine["threads"] = base.threads or machine["torch_threads"]  # what the measurements used
    return {"figures": figures, "machine": machine, "base": base,
            "results": results}


def ratios(figures: dict[str, float]) -> dict[str, float]:
    """The ratios issue 15 sets targets for, from one suite run."""
    f = figures
    return {
        "kv_g / sdpa_baseline": f["decode_kv_g_tok_s"] / f["decode_sdpa_baseline_tok_s"],
        "g_only / sdpa_baseline_no_cache": (f["decode_g_only_tok_s"]
                                            / f["decode_sdpa_baseline_no_cache_tok_s"]),
        "batch16 / kv_g": f["decode_batch16_tok_s"] / f["decode_kv_g_tok_s"],
        "int8 / float32 (kv_g)": f["decode_kv_g_int8_tok_s"] / f["decode_kv_g_tok_s"],
        "bf16 / float32 (kv_g)": f["decode_kv_g_bf16_tok_s"] / f["decode_kv_g_tok_s"],
        "g_only / no_cache": f["decode_g_only_tok_s"] / f["decode_no_cache_tok_s"],
        "train bf16 / float32": f["train_bf16_tok_s"] / f["train_tok_s"],
        "roofline fraction": f["decode_roofline_fraction"],
    }


__all__ = ["SUITE", "KEYS", "PREFILL_KEY", "suite_keys", "DERIVED", "run_suite", "ratios", "decode_bytes_per_token"]
