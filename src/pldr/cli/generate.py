"""`pldr generate`: text or ids in, streamed text or JSON out."""

from __future__ import annotations

import argparse

from ..devices import INFERENCE_DTYPES
from ..errors import PLDRError
from ..model.cache import CACHE_MODES
from .common import add_model_args, load_model_args, load_tokenizer_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the KV/G caches",
                       description="Continue one prompt or a batch of prompts. Text prompts are "
                       "encoded as the original does (the EOS the tokenizer appends is dropped).")
    add_model_args(p, G_LM_help="predefined G_LM file used at every step instead of the model's own "
                   "(v510 and v510G; an original v510G .pth needs one)",
                   dtypes=INFERENCE_DTYPES,
                   dtype_help="float32, bfloat16, or int8 (CPU; int8 weights, activations "
                   "rounded to int8 per call)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat for a batch")
    p.add_argument("--ids", action="append", default=[], metavar="5,6,7",
                   help="prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache", default="kv_g", choices=CACHE_MODES,
                   help="kv_g: KV + G cache (default); kv_only; g_only; no_cache")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off, 1: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling (every prompt alike)")
    p.add_argument("--eos-id", type=int, help="stop token (default: the config's; -1 never stops)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step under torch.compile (kv_g/kv_only; same tokens)")
    p.add_argument("--json", action="store_true", help="print ids and text per prompt as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..inference.generate import stream
    from ..inference.sampling import SamplingConfig

    # everything that can be checked without loading the model, first
    SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise PLDRError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt and not args.ids:
        raise PLDRError("give at least one --prompt TEXT or --ids 5,6,7")
    id_prompts = [_parse_ids(s) for s in args.ids]
    tokenizer = load_tokenizer_arg(args, "text prompts" if args.prompt else None)
    if args.compile and args.cache not in ("kv_g", "kv_only"):
        raise PLDRError(f"--compile needs --cache kv_g or kv_only, not {args.cache}")
    model, G_LM = load_model_args(args)

    prompts = [_strip_eos(tokenizer.encode(t), model.config.eos_id) for t in args.prompt]
    prompts += id_prompts
    steps = stream(model, prompts, args.max_new_tokens, cache=args.cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   G_LM=G_LM, eos_id=args.eos_id, seed=args.seed, compile=args.compile)
    new: list[list[int]] = [[] for _ in prompts]
    live = len(prompts) == 1 and not args.json and tokenizer is not None
    shown = ""
    for tokens in steps:
        for row, t in zip(new, tokens):
            if t is not None:
                row.append(t)
        if live:
            shown = _print_new_text(tokenizer.decode(new[0]), shown)
    if live:
        _print_new_text(tokenizer.decode(new[0]), shown, final=True)
        print()
        return 0
    texts = [tokenizer.decode(r) if tokenizer else None for r in new]
    if args.json:
        print(json.dumps([{"prompt_ids": p, "ids": r, "text": t}
                          for p, r, t in zip(prompts, new, texts)], indent=2))
    else:
        for i, (r, t) in enumerate(zip(new, texts)):
            print(f"[{i}] {t if t is not None else ','.join(map(str, r))}")
    return 0


def _print_new_text(text: str, shown: str, final: bool = False) -> str:
    """Print what `text` adds to the `shown` text; returns the text shown so far.

    A character spelled as several byte pieces decodes to U+FFFD until its last byte arrives,
    so printing waits for it (except at the end)."""
    if text.endswith("\ufffd") and not final:
        return shown
    if text.startswith(shown):
        print(text[len(shown):], end="", flush=True)
        return text
    return shown  # decoding changed earlier text: leave what is on screen


def _parse_ids(text: str) -> list[int]:
    """'5,6,7' -> [5, 6, 7], with an error that shows the bad part."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise PLDRError(f"--ids expects comma-separated integers like 5,6,7, got {text!r}") from None


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    """The original drops the EOS that encoding appends before it generates."""
    return ids[:-1] if ids and ids[-1] == eos_id else ids
