"""`pldr inspect`: heatmaps of the deductive outputs, G_LM invariance and spectra, and the
cache check, for a few inputs (pldr.analysis.inspect_model)."""

from __future__ import annotations

import argparse

from ..devices import ANALYSIS_DTYPES
from ..errors import PLDRError
from ..analysis.plots import DEFAULT_DPI, FORMATS as PICTURE_FORMATS  # no matplotlib yet
from .common import add_model_args, load_tokenizer_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="pictures and numbers of the deductive outputs (A, A_LM, A_P, G_LM)",
                       description="Run the model on each input, draw its deductive outputs per "
                       "layer, measure how much G_LM varies between the inputs (RMSE), its det "
                       "and singular values, and how much the caches change the deductive "
                       "outputs. Writes report.json, pictures and index.html to --out; an "
                       "earlier inspect output there is replaced as a whole.")
    add_model_args(p, G_LM_help="G_LM file for a v510G checkpoint",
                   dtypes=ANALYSIS_DTYPES,
                   dtype_help="float64 shows the cache check at its exact size (about 1e-15)")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="an input text (its EOS is dropped, as for a prompt); repeatable")
    p.add_argument("--ids", action="append", default=[], metavar="5,6,7",
                   help="an input as comma-separated token ids; repeatable")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.json, PNGs, index.html")
    p.add_argument("--layers", metavar="0,2-4", help="layers to report (default: all)")
    p.add_argument("--no-pictures", action="store_true", help="report.json only (no matplotlib needed)")
    p.add_argument("--dpi", type=int, default=DEFAULT_DPI, metavar="N",
                   help=f"dots per inch of PNG pictures (default {DEFAULT_DPI}: the labels of "
                   "a 14-head figure stay legible; lower it for smaller files)")
    p.add_argument("--format", choices=PICTURE_FORMATS, default="png",
                   help="picture format (default png; svg and pdf scale without blur)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..analysis.inspection import inspect_model
    from ..analysis.plots import require_matplotlib
    from ..analysis.report import headline_rows
    from .generate import _parse_ids, _strip_eos

    if not args.text and not args.ids:
        raise PLDRError("give at least one --text TEXT or --ids 5,6,7")
    id_inputs = [_parse_ids(s) for s in args.ids]
    if not args.no_pictures:
        require_matplotlib()
    layers = parse_layers(args.layers) if args.layers else None
    model, tokenizer = load_for_analysis(args, "text inputs" if args.text else None)
    texts = [_strip_eos(tokenizer.encode(t), model.config.eos_id) for t in args.text]
    labels = [f"text {i}: {t}" for i, t in enumerate(args.text)]
    labels += [f"ids {i}" for i in range(len(id_inputs))]
    meta = {"model": {"path": args.model, "variant": model.config.variant,
                      "num_layers": model.config.num_layers, "num_heads": model.config.num_heads,
                      "dk": model.config.dk},
            "texts": list(args.text)}
    report = inspect_model(model, texts + id_inputs, args.out, labels=labels, layers=layers,
                           meta=meta, pictures=not args.no_pictures, dpi=args.dpi,
                           fmt=args.format)
    print_table(headline_rows(report))
    out = Path(args.out)
    print(f"wrote {out / 'report.json'}" + ("" if args.no_pictures else f" and {out / 'index.html'}"))
    return 0


def load_for_analysis(args: argparse.Namespace, tokenizer_for: str | None):
    """The model (in --dtype, float64 included) and, when `tokenizer_for` names what needs
    one, its tokenizer (--tokenizer, else the model directory's own)."""
    import torch

    from ..checkpoint.load import load_model
    from ..devices import resolve_device

    tokenizer = load_tokenizer_arg(args, tokenizer_for)
    dtype = getattr(args, "dtype", "float32")
    model = load_model(args.model, args.config, G_LM=getattr(args, "G_LM", None),
                       device=resolve_device(args.device),
                       dtype=None if dtype == "float64" else dtype)
    if dtype == "float64":
        model = model.to(torch.float64)
    return model, tokenizer


def parse_layers(text: str) -> list[int]:
    """'0,2-4' -> [0, 2, 3, 4], with an error that shows the bad part."""
    layers = []
    for part in text.replace(" ", "").split(","):
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                layers += list(range(int(a), int(b) + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise PLDRError(f"--layers expects indices like 0,2-4, got {text!r}") from None
    if not layers:
        raise PLDRError(f"--layers expects indices like 0,2-4, got {text!r}")
    return layers


def print_table(rows: list[list[str]]) -> None:
    """Rows of strings as aligned columns."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
