"""`pldr generate`: text or ids in, streamed text or JSON out."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..data.detokenize import TextDecoder
from ..devices import INFERENCE_DTYPES
from ..errors import PLDRError
from ..model.cache import CACHE_MODES
from .common import DefaultsHelpFormatter, add_model_args, load_model_args, load_tokenizer_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the KV/G caches",
                       formatter_class=DefaultsHelpFormatter,
                       description="Continue one prompt or a batch of prompts. Text prompts are "
                       "encoded as the original does (the EOS the tokenizer appends is dropped). "
                       "Prints each prompt followed by its continuation as one text, the "
                       "continuation in bold on a terminal (plain when piped); --json gives "
                       "the continuation alone, with its leading space.")
    add_model_args(p, G_LM_help="predefined G_LM file used at every step instead of the model's own "
                   "(v510 and v510G; an original v510G .pth needs one)",
                   dtypes=INFERENCE_DTYPES,
                   dtype_help="float32, bfloat16, or int8 (CPU; int8 weights, activations "
                   "rounded to int8 per call)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat for a batch")
    p.add_argument("--ids", action="append", default=[], metavar="5,6,7",
                   help="prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per prompt (fewer when EOS comes first)")
    p.add_argument("--cache", default="kv_g", choices=CACHE_MODES,
                   help="kv_g: KV + G cache (A and G_LM fixed at the prompt, as the original); "
                   "kv_only; g_only; no_cache (recompute everything each step)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off, 1: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int,
                   help="seed for reproducible sampling, every prompt alike (default: random)")
    p.add_argument("--eos-id", type=int,
                   help="stop token; -1 never stops (default: the config's eos_id)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step under torch.compile (kv_g/kv_only; same tokens) "
                   "(default: off)")
    p.add_argument("--json", action="store_true",
                   help="print prompt_ids, ids and text (the continuation) per prompt as JSON "
                   "(default: the text)")
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
    # the prompts' own text: as typed for --prompt, decoded for --ids
    prompt_texts = list(args.prompt) + [tokenizer.decode(p) if tokenizer else None
                                        for p in id_prompts]
    bold, plain = _emphasis(sys.stdout)
    new: list[list[int]] = [[] for _ in prompts]
    live = len(prompts) == 1 and not args.json and tokenizer is not None
    if live:  # one prompt: print it, then stream its continuation as it comes
        print(prompt_texts[0] + bold, end="", flush=True)
        decoder, shown = TextDecoder(tokenizer, prompts[0]), ""
    for tokens in steps:
        for row, t in zip(new, tokens):
            if t is not None:
                row.append(t)
        if live and tokens[0] is not None:
            shown = _print_new_text(decoder.add([tokens[0]]), shown)
    if live:
        _print_new_text(decoder.add([]), shown, final=True)
        print(plain)
        return 0
    texts = [TextDecoder(tokenizer, p).add(r) if tokenizer else None
             for p, r in zip(prompts, new)]
    if args.json:
        print(json.dumps([{"prompt_ids": p, "ids": r, "text": t}
                          for p, r, t in zip(prompts, new, texts)], indent=2))
    else:
        for i, (r, p, t) in enumerate(zip(new, prompt_texts, texts)):
            shown = f"{p}{bold}{t}{plain}" if t is not None else ",".join(map(str, r))
            print(f"[{i}] {shown}")
    return 0


def _emphasis(out: Any) -> tuple[str, str]:
    """The escape codes that set a continuation apart from its prompt: bold on a terminal,
    nothing when the output is piped or NO_COLOR is set (https://no-color.org)."""
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty() and not os.environ.get("NO_COLOR"):
        return "\033[1m", "\033[0m"
    return "", ""


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
