"""`pldr extract-G`: the mean G_LM (and A_LM) of a model over chunks of a data source,
written as a predefined G_LM file (pldr.analysis.extract_G_LM)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import ANALYSIS_DTYPES
from ..errors import PLDRError
from .common import add_model_args

FORMATS = ("safetensors", "original")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-G", help="mean G_LM over data chunks, as a predefined G_LM file",
                       description="Average the G_LM (and A_LM) that the model infers over the "
                       "first --samples chunks of --data, streamed in batches, and write it as a "
                       "G_LM file that --G-LM, pldr.load_G_LM and v510G models read. A report "
                       "of its spread over the chunks goes beside it as FILE.report.json "
                       "(G.safetensors -> G.safetensors.report.json), so outputs of two "
                       "formats never share a report.")
    add_model_args(p, G_LM_help="G_LM file for a v510G checkpoint",
                   dtypes=ANALYSIS_DTYPES)
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="builtin, a .txt/.jsonl/.parquet/.csv file or folder, or hf:NAME[:CONFIG]")
    p.add_argument("--split", default="train", help="split and slice, e.g. train[:1000] (default train)")
    p.add_argument("--text-column", help="text column of structured data")
    p.add_argument("--samples", type=int, required=True, metavar="N", help="chunks to average over")
    p.add_argument("--context-length", type=int, metavar="T",
                   help="tokens per chunk (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="chunks per forward (default 8)")
    p.add_argument("--out", required=True, metavar="FILE", help="the G_LM file to write")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (G_LM and A_LM, default) or original (the release's pickled "
                   "list of G_LM [1, H, dk, dk])")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..analysis.extract import chunk_batches, data_chunks, extract_G_LM, spread_report
    from ..checkpoint.glm import save_G_LM, save_G_LM_original
    from ..files import atomic_write_text
    from .inspect import load_for_analysis, print_table

    out = Path(args.out)
    if args.samples < 1:
        raise PLDRError(f"--samples must be at least 1, got {args.samples}")
    if args.batch_size < 1:
        raise PLDRError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.format == "safetensors" and out.suffix != ".safetensors":
        raise PLDRError(f"--format safetensors writes *.safetensors; name --out so, not {out.name!r} "
                        "(or pass --format original)")
    model, tokenizer = load_for_analysis(args, "--data chunks")
    T = args.context_length or model.config.max_seq_len
    if not 2 <= T <= model.config.max_seq_len:
        raise PLDRError(f"--context-length must be in 2..{model.config.max_seq_len} (max_seq_len), "
                        f"got {T}")
    chunks = data_chunks(args.data, tokenizer, T, args.samples, split=args.split,
                         text_column=args.text_column)
    result = extract_G_LM(model, chunk_batches(chunks, args.batch_size))
    if args.format == "original":
        save_G_LM_original(result.G_LM, out)
    else:
        save_G_LM(result.G_LM.float(), out,
                  A_LM=None if result.A_LM is None else result.A_LM.float())
    report = {"model": args.model, "data": args.data, "split": args.split, "context_length": T,
              "format": args.format, "file": str(out), **spread_report(result)}
    report_path = report_path_of(out)
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
    rows = [["layer", "G_LM rms", "rmse to mean", "relative"]]
    for L in report["layers"]:
        rel = L["G_LM_rel_rmse"]
        rows.append([str(L["layer"]), f"{L['G_LM_rms']:.3e}", f"{L['G_LM_rmse_to_mean']:.3e}",
                     "n/a" if rel is None else f"{rel:.3e}"])
    print_table(rows)
    print(f"mean G_LM over {result.samples} chunks of {T} tokens -> {out} (report {report_path})")
    return 0


def report_path_of(out: Path) -> Path:
    """The report of G_LM file `out`: its full name + .report.json, so two outputs that differ
    only in suffix (G.safetensors, G.pkl) never write the same report."""
    return out.with_name(out.name + ".report.json")
