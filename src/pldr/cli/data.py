"""`pldr data prepare` and `pldr data info`: token stores for pretraining."""

from __future__ import annotations

import argparse
import sys

from .common import Parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare a token store from a corpus, or show one",
                       description="Pretraining data: `pldr data prepare` tokenises a corpus "
                       "once into a token store (streamed, in parallel, resumable); `pldr train "
                       "--data DIR` then reads it memory-mapped.")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True,
                               parser_class=Parser)
    prep = actions.add_parser("prepare", help="tokenise a data source into a token store",
                              description="Tokenise the documents of --data in --workers "
                              "processes, each reading its own part of the input, and write a "
                              "token store to --out (the same store for any --workers). Run the "
                              "same command again after an interruption (even kill -9) to "
                              "continue; the result is the same store.")
    prep.add_argument("--data", required=True, metavar="SOURCE",
                      help="builtin, a .txt/.jsonl/.parquet/.csv file, a folder of them, or "
                      "hf:NAME[:CONFIG] (streamed)")
    prep.add_argument("--out", required=True, metavar="DIR", help="the store folder")
    prep.add_argument("--tokenizer", metavar="FILE", help="SentencePiece .model (default: "
                      "train one on the first --sample-docs documents and keep it in DIR)")
    prep.add_argument("--workers", type=int, default=1, metavar="N",
                      help="tokenising processes (default 1)")
    prep.add_argument("--split", metavar="SPLIT", help="split name (hf: data), with an "
                      "optional slice such as train[:1000000]; a percentage first counts the "
                      "documents (default: all of train)")
    prep.add_argument("--text-column", metavar="NAME",
                      help="text column of structured data (default: content, then text)")
    prep.add_argument("--vocab-size", type=int, default=32000, metavar="N",
                      help="vocabulary of a tokenizer trained here (default 32000)")
    prep.add_argument("--sample-docs", type=int, default=100_000, metavar="N",
                      help="documents a tokenizer trained here learns from (default 100000)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 26, metavar="N",
                      help="ids per shard (default 67108864)")
    prep.add_argument("--batch-chars", type=int, default=1 << 20, metavar="N",
                      help="characters a worker tokenises at a time; a worker's task holds "
                      "about 4 of these (default 1048576)")
    prep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar (default: when stderr is a terminal)")
    prep.set_defaults(func=run_prepare)
    info = actions.add_parser("info", help="show what a token store holds")
    info.add_argument("store", metavar="DIR")
    info.add_argument("--tokenizer", metavar="FILE",
                      help="check that the store was prepared with this tokenizer")
    info.add_argument("--verify", action="store_true", help="recompute every shard's checksums")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_store
    from ..data.tokenizer import Tokenizer

    # without --tokenizer, prepare_store says (once, and only when it trains one) that it
    # trains a tokenizer and where it keeps it
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    report = prepare_store(args.data, args.out, tokenizer, split=args.split,
                           text_column=args.text_column, workers=args.workers,
                           shard_tokens=args.shard_tokens, batch_chars=args.batch_chars,
                           vocab_size=args.vocab_size, sample_docs=args.sample_docs,
                           progress=progress)
    s = report.store.summary()
    if report.already_complete:
        print(f"{s['path']} is already complete: {s['documents']:,} documents, "
              f"{s['tokens']:,} tokens")
        return 0
    resumed = f", {report.resumed_shards} shards kept from before" if report.resumed_shards else ""
    print(f"prepared {s['path']}: {s['documents']:,} documents, {s['tokens']:,} tokens "
          f"({s['dtype']}) in {s['shards']} shards; {report.text_bytes / 1e6:.1f} MB of text "
          f"in {report.seconds:.1f} s ({report.mb_per_s:.2f} MB/s){resumed}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import json

    from ..data.store import TokenStore
    from ..data.tokenizer import Tokenizer
    from ..errors import DataError

    store = TokenStore.open(args.store)
    if args.tokenizer:
        store.check_tokenizer(Tokenizer.load(args.tokenizer))
    s = store.summary()
    if args.verify:
        bad = store.verify()
        if bad:
            raise DataError(f"token store {s['path']!r} is damaged: checksums of "
                            f"{', '.join(bad[:5])} do not match; prepare it again")
        s["verified"] = True
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: token store of {s['source']}")
    print(f"  documents: {s['documents']:,}")
    print(f"  tokens: {s['tokens']:,} ({s['dtype']}, {s['token_bytes'] / 1e6:.1f} MB in "
          f"{s['shards']} shards)")
    print(f"  text: {s['text_bytes'] / 1e6:.1f} MB")
    print(f"  tokenizer: vocab {s['vocab_size']}, sha256 {s['tokenizer_sha256']}")
    print(f"  documents sha256: {s['documents_sha256']}")
    if args.verify:
        print("  checksums: all shards verified")
    return 0
