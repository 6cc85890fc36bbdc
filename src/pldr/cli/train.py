"""`pldr train`."""

from __future__ import annotations

import argparse

from ..devices import SUPPORTED_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..training.trainer import config_from_flags, train

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    result = train(config_from_flags(flags))
    if result.interrupted:
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.step} steps; model in {result.final_dir}")
    return 0
