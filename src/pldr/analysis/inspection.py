"""`inspect_model`: what `pldr inspect` does, as one library call. Collect the deductive
outputs of each input, compute the report, draw the pictures, write report.json and
index.html into one folder.

    OUT/report.json                 numbers per layer and head (report.DEFINITIONS)
    OUT/index.html                  every picture with its numbers
    OUT/G_LM_spread.png             G_LM across inputs, per layer
    OUT/G_LM_spectrum.png           singular values of G_LM, per layer
    OUT/input{i}_layer{l}.png       A, A_LM, A_P, G_LM of input i in layer l, heads in a row
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import PLDRError
from ..files import atomic_write_text
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
                  meta: dict[str, Any] | None = None, pictures: bool = True) -> dict[str, Any]:
    """Write the inspection of `inputs` (id lists) into folder `out`; returns the report."""
    layers = check_layers(layers, model.config.num_layers)
    if pictures:
        plots.require_matplotlib()
    items = collect(model, inputs, labels)
    report = build_report(items, layers, {"dtype": str(model.dtype).replace("torch.", ""),
                                          **(meta or {})})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if pictures:
        report["pictures"] = _draw(items, layers, out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    if pictures:
        write_index(out / "index.html", report, headline_rows(report))
    log.info("inspect: wrote %s", out)
    return report


def _draw(items, layers: list[int], out: Path) -> dict[str, Any]:
    """Every picture; returns their file names (relative to `out`) for the report."""
    kinds = list(items[0].kinds())
    limits = {(l, k): plots.colour_limits([it.kinds()[k][l] for it in items])
              for l in layers for k in kinds}
    heat = []
    for i, it in enumerate(items):
        names = {}
        for l in layers:
            name = f"input{i}_layer{l}.png"
            plots.heatmaps(out / name, {k: t[l] for k, t in it.kinds().items()},
                           {k: limits[(l, k)] for k in kinds},
                           f"{it.label}: layer {l} ({len(it.ids)} tokens)")
            names[str(l)] = name
        heat.append(names)
    G = torch.stack([it.G_LM for it in items])                    # [N, L, H, dk, dk]
    inv = invariance(G)
    plots.spread(out / "G_LM_spread.png", inv.pairwise, inv.to_mean,
                 [it.label for it in items], layers)
    plots.spectrum(out / "G_LM_spectrum.png", spectra(G).singular, layers)
    return {"heatmaps": heat, "spread": "G_LM_spread.png", "spectrum": "G_LM_spectrum.png"}
