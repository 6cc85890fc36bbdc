"""`inspect_model`: what `pldr inspect` does, as one library call. Collect the deductive
outputs of each input, compute the report, draw the pictures, write report.json and
index.html into one folder.

The folder is written whole: into a temporary folder beside it, renamed into place at the
end. An existing folder is replaced only when it is empty or an earlier inspect output
(its report.json says so and it holds nothing else than what inspect writes), so stale
pictures of an earlier run never sit beside new ones and nothing of the user's is deleted.

    OUT/report.json                 numbers per layer and head (report.DEFINITIONS)
    OUT/index.html                  every picture with its numbers
    OUT/G_LM_spread.FMT             G_LM across inputs, per layer
    OUT/G_LM_spectrum.FMT           singular values of G_LM, per layer (a line per head)
    OUT/input{i}_layer{l}.FMT       A, A_LM, A_P, G_LM of input i in layer l, heads in a row

FMT is png (default), svg or pdf; PNGs are drawn at `dpi` (default 150).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import PLDRError
from ..files import atomic_write_text, replace_dir, temp_sibling
from ..model.model import PLDRModel
from . import plots
from .collect import collect
from .html import write_index
from .report import build_report, headline_rows, invariance, spectra

log = logging.getLogger("pldr")


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The layers to report (all when None), each in range, sorted, without repeats."""
    if layers is None:
        return list(range(num_layers))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise PLDRError(f"layer {bad[0] if bad else '(none)'} is not a layer of this model; "
                        f"choose from 0..{num_layers - 1}")
    return sorted(set(layers))


def inspect_model(model: PLDRModel, inputs: Sequence[Sequence[int]], out: str | os.PathLike, *,
                  labels: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                  meta: dict[str, Any] | None = None, pictures: bool = True,
                  dpi: int = plots.DEFAULT_DPI, fmt: str = "png") -> dict[str, Any]:
    """Write the inspection of `inputs` (id lists) into folder `out`; returns the report.
    Pictures are `fmt` files (png, svg or pdf), drawn at `dpi` dots per inch."""
    layers = check_layers(layers, model.config.num_layers)
    if fmt not in plots.FORMATS:
        raise PLDRError(f"picture format `fmt` {fmt!r} is not one of {', '.join(plots.FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not MIN_DPI <= dpi <= MAX_DPI:
        raise PLDRError(f"`dpi` must be a whole number in {MIN_DPI}..{MAX_DPI}, got {dpi!r}")
    if pictures:
        plots.require_matplotlib()
    items = collect(model, inputs, labels)
    report = build_report(items, layers, {"dtype": str(model.dtype).replace("torch.", ""),
                                          **(meta or {})})
    report["content"] = CONTENT
    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        if pictures:
            report["pictures"] = _draw(items, layers, tmp, dpi, fmt)
        atomic_write_text(tmp / REPORT_FILE, json.dumps(report, indent=1) + "\n")
        if pictures:
            write_index(tmp / INDEX_FILE, report, headline_rows(report))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("inspect: wrote %s", out)
    return report


CONTENT = "pldr.inspect"  # report.json's "content": marks a folder inspect wrote
REPORT_FILE, INDEX_FILE = "report.json", "index.html"
PICTURE_SUFFIXES = (".png", ".svg", ".pdf")
MIN_DPI, MAX_DPI = 30, 600  # below 30 nothing is legible; above 600 a 110M figure is huge


def check_replaceable(out: Path) -> None:
    """Refuse an `out` that is a file, or a folder holding anything but an earlier inspect
    output (which is replaced as a whole, never mixed with the new pictures)."""
    if out.exists() and not out.is_dir():
        raise PLDRError(f"`out` {str(out)!r} exists and is not a folder; choose another `out`")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if n not in (REPORT_FILE, INDEX_FILE)
               and not (n.endswith(PICTURE_SUFFIXES) and (out / n).is_file())]
    if foreign or not _is_inspect_report(out / REPORT_FILE):
        what = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "") if foreign else \
            "no report.json of pldr inspect"
        raise PLDRError(f"{str(out)!r} is not an earlier pldr inspect output ({what}); "
                        "choose another `out` (an earlier output is replaced as a whole)")


def _is_inspect_report(path: Path) -> bool:
    """Whether `path` is a report.json that inspect wrote (marked, or, from before the mark,
    with inspect's definitions)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    return report.get("content") == CONTENT or (
        isinstance(report.get("definitions"), dict) and "G_LM_rmse" in report["definitions"])


def _draw(items, layers: list[int], out: Path, dpi: int, fmt: str) -> dict[str, Any]:
    """Every picture; returns their file names (relative to `out`) for the report."""
    kinds = list(items[0].kinds())
    limits = {(l, k): plots.colour_limits([it.kinds()[k][l] for it in items])
              for l in layers for k in kinds}
    heat = []
    for i, it in enumerate(items):
        names = {}
        for l in layers:
            name = f"input{i}_layer{l}.{fmt}"
            figure = plots.heatmaps_figure({k: t[l] for k, t in it.kinds().items()},
                                           {k: limits[(l, k)] for k in kinds},
                                           f"{it.label}: layer {l} ({len(it.ids)} tokens)")
            plots.save(figure, out / name, dpi)
            names[str(l)] = name
        heat.append(names)
    G = torch.stack([it.G_LM for it in items])                    # [N, L, H, dk, dk]
    inv = invariance(G)
    spread, spectrum = f"G_LM_spread.{fmt}", f"G_LM_spectrum.{fmt}"
    plots.save(plots.spread_figure(inv.pairwise, inv.to_mean, [it.label for it in items],
                                   layers), out / spread, dpi)
    plots.save(plots.spectrum_figure(spectra(G).singular, layers), out / spectrum, dpi)
    return {"heatmaps": heat, "spread": spread, "spectrum": spectrum}
