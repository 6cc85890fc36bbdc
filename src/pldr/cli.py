"""The `pldr` command line: argument parsing, input validation and one-line errors.

Each subcommand is a pair of plain functions: `_add_<name>(subparsers)` declares its flags and
`cmd_<name>(args)` runs it. Library errors (`PLDRError`, and ValueError/TypeError/OSError
raised on bad input) become `error: ...` on stderr with exit status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from .devices import SUPPORTED_DTYPES
from .errors import PLDRError


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one `error:` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


# ----- subcommands ------------------------------------------------------------------------
# Each `_add_*` returns nothing and sets `func` on its parser.


def _add_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=cmd_version)


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    print(version("pldr-llm"))
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an original .pth checkpoint to a model directory",
                       description="Load an original PLDR-LLM checkpoint with its hpdict and write "
                       "our directory (config.json + model.safetensors [+ tokenizer.model]).")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="original checkpoint (.pth/.pt: a dict with model_state_dict, or a "
                   "state dict)")
    p.add_argument("--config", metavar="JSON",
                   help="the model's hpdict or a config.json (needed with --checkpoint)")
    p.add_argument("--dcp", metavar="DIR",
                   help="instead of --checkpoint: a Distributed Checkpoint of a multi-process "
                   "`pldr train` run (OUT/checkpoints/step-N)")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE",
                   help="G_LM file for a v510G checkpoint (predefined pickle, .pt or .safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--tokenizer", metavar="FILE", help="SentencePiece .model to copy along")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES,
                   help="cast the weights (default: as stored)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, save_pretrained

    if args.dcp is not None:
        return _convert_dcp(args)
    if args.checkpoint is None or args.config is None:
        raise PLDRError("give --checkpoint FILE with --config JSON (an original checkpoint), "
                        "or --dcp DIR (a checkpoint of a multi-process `pldr train` run)")
    model = load_model(args.checkpoint, args.config, G_LM=args.G_LM, dtype=args.dtype)
    save_pretrained(model, args.out, tokenizer=args.tokenizer)
    print(f"wrote {args.out} ({model.config.variant}, {model.num_parameters():,} parameters, "
          f"{str(model.dtype).removeprefix('torch.')})")
    return 0


def _convert_dcp(args: argparse.Namespace) -> int:
    """`pldr convert --dcp DIR --out DIR2`: a sharded training checkpoint to a model folder."""
    from .config import PLDRConfig
    from .distributed import dcp_to_pretrained

    if args.checkpoint is not None or args.config is not None or args.G_LM is not None:
        raise PLDRError("--dcp takes the config and weights from the checkpoint folder; drop "
                        "--checkpoint, --config and --G-LM")
    out = dcp_to_pretrained(args.dcp, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    config = PLDRConfig.from_json(out)  # the summary comes from the config: no read-back
    print(f"wrote {out} ({config.variant}, {config.num_parameters():,} parameters, "
          f"{args.dtype or 'float32'})")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's config, variant and parameter count")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model directory, or an original checkpoint (then give --config)")
    p.add_argument("--config", metavar="JSON",
                   help="hpdict or config.json (overrides the directory's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.model, args.config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['variant']}, {info['num_parameters']:,} parameters, "
          f"{info['num_tensors']} tensors, dtype {'/'.join(info['dtypes'])}")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer",
                       description="Tokenizer tools. `pldr tokenizer train` trains a SentencePiece "
                       "model with the paper tokenizer's special ids ([PAD]=0, [UNK]=1, "
                       "[START]=2, [END]=3, [SEP]=4, [CLS]=5) that reproduces any text exactly.")
    actions = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True,
                               parser_class=_Parser)
    t = actions.add_parser("train", help="train a tokenizer on files or a data source")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE",
                        help="data files (.txt split at blank lines, .jsonl/.json/.parquet/.csv)")
    source.add_argument("--data", metavar="SPEC",
                        help="a data source: builtin, a file or folder, or hf:NAME[:CONFIG]")
    t.add_argument("--split", metavar="SPLIT", help="slice of the data, e.g. train[:90%%] "
                   "(default: all of train)")
    t.add_argument("--text-column", metavar="NAME",
                   help="text column of structured data (default: content, then text)")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="number of pieces")
    t.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                   help="SentencePiece algorithm (default unigram, as the paper's tokenizer)")
    t.set_defaults(func=cmd_tokenizer_train)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import load_documents
    from .tokenizer import Tokenizer

    specs = args.input if args.input else [args.data]
    texts = [doc for spec in specs
             for doc in load_documents(spec, args.split, args.text_column, progress=True)]
    tok = Tokenizer.train(texts, args.vocab_size, args.out, model_type=args.model_type)
    print(f"wrote {tok.path} and {tok.path.with_suffix('.vocab')} ({tok.vocab_size} pieces, "
          f"trained on {len(texts)} documents)")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the KV/G caches",
                       description="Continue one prompt or a batch of prompts. Text prompts are "
                       "encoded as the original does (the EOS the tokenizer appends is dropped).")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model directory (save_pretrained / pldr train) or an original .pth checkpoint")
    p.add_argument("--config", metavar="JSON", help="hpdict or config.json for an original checkpoint")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece .model (default: the model directory's tokenizer.model)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat for a batch")
    p.add_argument("--ids", action="append", default=[], metavar="5,6,7",
                   help="prompt as comma-separated token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache", default="kv_g", choices=("kv_g", "kv_only", "g_only", "no_cache"),
                   help="kv_g: KV + G cache (default); kv_only; g_only; no_cache")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off, 1: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--eos-id", type=int, help="stop token (default: the config's; -1 never stops)")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE",
                   help="predefined G_LM file used at every step instead of the model's own")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32")
    p.add_argument("--json", action="store_true", help="print ids and text per prompt as JSON")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .checkpoint import load_G_LM, load_model
    from .devices import resolve_device
    from .generate import SamplingConfig, stream
    from .tokenizer import Tokenizer

    # everything that can be checked without loading the model, first
    SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise PLDRError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt and not args.ids:
        raise PLDRError("give at least one --prompt TEXT or --ids 5,6,7")
    id_prompts = [_parse_ids(s) for s in args.ids]
    # --tokenizer, else the model folder's own tokenizer.model (an original .pth has none)
    source = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    tok_file = Tokenizer.find(source) if source is not None else None
    if args.prompt and tok_file is None:
        raise PLDRError("text prompts need a tokenizer: pass --tokenizer FILE.model (model "
                        "directories written by pldr carry their own)")
    tokenizer = Tokenizer.load(tok_file) if tok_file is not None else None
    model = load_model(args.model, args.config, device=resolve_device(args.device),
                       dtype=args.dtype)
    G_LM = load_G_LM(args.G_LM) if args.G_LM else None

    prompts = [_strip_eos(tokenizer.encode(t), model.config.eos_id) for t in args.prompt]
    prompts += id_prompts
    steps = stream(model, prompts, args.max_new_tokens, cache=args.cache,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   G_LM=G_LM, eos_id=args.eos_id, seed=args.seed)
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill/training speed and peak memory",
                       description="Each measurement runs in a fresh process (median of "
                       "--repeats after a warm-up); CPU flags and load are recorded. Compare "
                       "figures only within one run.")
    p.add_argument("--model", default="pldr-110m", help="preset name or model directory")
    p.add_argument("--what", default="decode,prefill,train",
                   help="comma-separated: decode, prefill, train")
    p.add_argument("--cache", default="kv_g,kv_only,g_only,no_cache",
                   help="comma-separated cache modes for decode")
    p.add_argument("--compare-G", action="store_true",
                   help="also measure the v510G (identity G_LM, plain SDPA) twin of a preset")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--json", metavar="FILE", help="also write machine info and results as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from .bench import MEASUREMENTS, BenchSpec, format_table, machine_info, measure
    from .config import PRESETS
    from .generate import CACHE_MODES

    whats = [w for w in args.what.split(",") if w]
    caches = [c for c in args.cache.split(",") if c]
    dtypes = [d for d in args.dtype.split(",") if d]
    for w in whats:
        if w not in MEASUREMENTS:
            raise PLDRError(f"--what {w!r} is unknown; choose from {', '.join(MEASUREMENTS)}")
    for c in caches:
        if c not in CACHE_MODES:
            raise PLDRError(f"--cache {c!r} is unknown; choose from {', '.join(CACHE_MODES)}")
    for d in dtypes:
        if d not in SUPPORTED_DTYPES:
            raise PLDRError(f"--dtype {d!r} is unknown; choose "
                            f"{' or '.join(SUPPORTED_DTYPES)}")
    if args.model not in PRESETS and not Path(args.model).is_dir():
        raise PLDRError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) "
                        "nor a model directory")
    if args.repeats < 1:
        raise PLDRError("--repeats must be >= 1")
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
                    specs.append(BenchSpec(what=w, cache=c, variant=variant, dtype=dtype, **common))
    info = machine_info()
    print(f"cpu: {info['cpu']} flags: {' '.join(info['cpu_flags'])} nproc: {info['nproc']} "
          f"torch {info['torch']} threads {info['torch_threads']} load {info['loadavg']}",
          flush=True)
    results = []
    for spec in specs:
        results.append(measure(spec))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "machine_after": machine_info(),
             "results": [asdict(r) for r in results]}, indent=2))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    # Flags left out keep TrainConfig's defaults, or with --resume the resumed run's settings.
    p = sub.add_parser("train", help="train a PLDR-LLM (torchrun for several processes)",
                       argument_default=argparse.SUPPRESS,
                       description="Train a model on a data source; writes checkpoints, "
                       "metrics.jsonl, TensorBoard events and OUT/final (a model directory). "
                       "Run under `torchrun --nproc_per_node=N -m pldr train ...` to shard the "
                       "model with FSDP2 over N processes.")
    p.add_argument("--model", metavar="PRESET|JSON",
                   help="preset (tiny, pldr-110m, pldr-110m-G) or a config.json / original "
                   "hpdict; vocab_size comes from the tokenizer (default tiny)")
    p.add_argument("--data", metavar="SOURCE",
                   help="builtin, a .txt/.jsonl/.parquet/.csv file, a folder, or hf:NAME[:CONFIG] "
                   "(default builtin)")
    p.add_argument("--split", help="training slice, e.g. train[:90%%] (default train[:90%%])")
    p.add_argument("--val-split", help="validation slice (default train[90%%:] with the default "
                   "--split); none turns validation off")
    p.add_argument("--text-column", help="text column of structured data (default content, text)")
    p.add_argument("--chunk-mode", choices=("pack", "pad", "nopad"),
                   help="how documents become chunks (default pack)")
    p.add_argument("--batch-agg-count", type=int, help="pad/nopad modes: documents are "
                   "concatenated batch_size * this many at a time (default 1)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece .model (default: train one on the data and save it)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a trained tokenizer (default: "
                   "the model's vocab_size)")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/train)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=int, help="passes over the data (default 1; with "
                   "--max-steps, whichever ends first)")
    p.add_argument("--batch-size", type=int, help="global batch: rows per micro-batch over all "
                   "processes (default 16)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--context-length", type=int,
                   help="tokens per row (default: the model's max_seq_len)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 100)")
    p.add_argument("--lr-alpha", type=float,
                   help="final learning rate as a fraction of --lr (default 0.1)")
    p.add_argument("--lr-total-steps", type=int,
                   help="step where the cosine decay ends (default: the run's total steps)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--seed", type=int, help="seed of initial weights and data order (default 0)")
    p.add_argument("--save-every", type=int,
                   help="checkpoint every N steps (default 0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int,
                   help="keep the last K checkpoints (default 3; 0 keeps all)")
    p.add_argument("--eval-every", type=int,
                   help="validate every N steps (default 0: at the end only)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation "
                   "(default: all)")
    p.add_argument("--log-every", type=int, help="report every N steps (default 10)")
    p.add_argument("--resume", metavar="CKPT|auto",
                   help="continue from a checkpoint folder, or auto: the latest in --out")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES,
                   help="bfloat16: autocast (and FSDP mixed precision) with fp32 weights")
    p.add_argument("--dag-coeffs", metavar="cA,cAp,cG",
                   help="DAG regularisation coefficients (default 0,0,0; DAG values are logged "
                   "anyway)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="write TensorBoard events to OUT/tb (default on)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="tokenised-data cache (default $PLDR_CACHE_DIR or ~/.cache/pldr)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train import config_from_flags, train

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    result = train(config_from_flags(flags))
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.step} steps; model in {result.final_dir}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the tiny model on the built-in corpus, then generate",
                       description="The main job in a few minutes on 2 CPU cores: train the tiny "
                       "preset (and a 2048-piece tokenizer) on the built-in corpus, generate with "
                       "the KV + G cache, and show the loss curve and how much G_LM varies "
                       "between prompts.")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="run folder (default runs/demo; a previous demo there is replaced)")
    p.add_argument("--steps", type=int, default=600,
                   help="training steps (default 600, about 2-3 minutes on 2 CPU cores)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.steps < 1:
        raise PLDRError(f"--steps must be >= 1, got {args.steps}")
    run_demo(args.out, steps=args.steps, device=args.device, dtype=args.dtype,
             progress=args.progress)
    return 0


# Registration order is the order in `pldr --help`.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_version,
    _add_demo,
    _add_train,
    _add_generate,
    _add_bench,
    _add_convert,
    _add_inspect,
    _add_tokenizer,
]


def build_parser() -> argparse.ArgumentParser:
    """The full `pldr` parser with every registered subcommand."""
    parser = _Parser(prog="pldr", description="PLDR-LLMs: train, generate, convert, inspect, benchmark.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pldr` console script and `python -m pldr`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or "--debug" in argv
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except (PLDRError, ValueError, TypeError, OSError) as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {_one_line(e)}\n")
        return 2


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (no traceback)."""
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
