"""`pldr tokenizer train`."""

from __future__ import annotations

import argparse

from .common import Parser


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer",
                       description="Tokenizer tools. `pldr tokenizer train` trains a SentencePiece "
                       "model with the paper tokenizer's special ids ([PAD]=0, [UNK]=1, "
                       "[START]=2, [END]=3, [SEP]=4, [CLS]=5) that reproduces any text exactly.")
    actions = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True,
                               parser_class=Parser)
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
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.sources import load_documents
    from ..data.tokenizer import Tokenizer

    specs = args.input if args.input else [args.data]
    texts = [doc for spec in specs
             for doc in load_documents(spec, args.split, args.text_column, progress=True)]
    tok = Tokenizer.train(texts, args.vocab_size, args.out, model_type=args.model_type)
    print(f"wrote {tok.path} and {tok.path.with_suffix('.vocab')} ({tok.vocab_size} pieces, "
          f"trained on {len(texts)} documents)")
    return 0
