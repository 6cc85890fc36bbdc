"""Pictures of the deductive outputs (matplotlib, the `analysis` extra).

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so no global figure state or display backend is involved. Each `*_figure` function
returns its figure; `save` writes it as PNG, SVG or PDF (by the file's suffix) at a DPI.
Sizes are in inches and fonts in points, so a higher DPI gives the same picture with more
pixels: the default, 150, keeps the 5-7 pt labels of a 14-head (110M) model legible.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import import_extra
from ..files import atomic_path

DEFAULT_DPI = 150
FORMATS = ("png", "svg", "pdf")


def require_matplotlib() -> None:
    """Fail early, with the fix, when the `analysis` extra is not installed."""
    import_extra("matplotlib", "analysis", "pictures")


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike, dpi: int = DEFAULT_DPI) -> None:
    """Write `fig` to `path` (atomically) in the format of its suffix (.png, .svg, .pdf)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise PLDRError(f"pictures are written as {', '.join(FORMATS)}, not {fmt or 'no suffix'!r}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)


def line_colours(n: int) -> list:
    """`n` distinct colours for n lines (matplotlib's default cycle repeats after 10, so head
    10 would look like head 0): tab10, tab20, else evenly spaced on a continuous map."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def colour_limits(tensors: Sequence[Tensor]) -> tuple[float, float, str]:
    """One colour scale for a kind of tensor: (vmin, vmax, colormap) from the 0.5% and 99.5%
    quantiles of all values, so a few outliers do not wash out the rest; symmetric around 0
    with a diverging map when the values have both signs."""
    values = torch.cat([t.reshape(-1).double() for t in tensors])
    if values.numel() > 2_000_000:  # quantile of a huge tensor: a strided sample is enough
        values = values[:: values.numel() // 1_000_000]
    lo, hi = torch.quantile(values, torch.tensor([0.005, 0.995], dtype=values.dtype)).tolist()
    if lo < 0 < hi:
        m = max(-lo, hi)
        return -m, m, "RdBu_r"
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi, "viridis"


def heatmaps_figure(tensors: dict[str, Tensor], limits: dict[str, tuple[float, float, str]],
                    title: str):
    """One row of heads per kind of tensor ({kind: [H, dk, dk]}), each row on its own colour
    scale (`limits[kind]`) with a colour bar; axes are the matrix's row and column index.

    The grid is laid out by hand (no layout engine) and ticks are fixed: with dozens of
    panels, automatic layout would take most of the drawing time."""
    kinds = list(tensors)
    H, dk = next(iter(tensors.values())).shape[:2]
    cols = min(H, 16)
    rows_per_kind = math.ceil(H / cols)
    nrows = rows_per_kind * len(kinds)
    width, height = 1.25 * cols + 1.2, 1.55 * nrows + 0.5  # inches
    fig = _figure(width, height, layout=None)
    fig.suptitle(title, fontsize=10)
    # margins in inches, so the colour bars' labels fit whatever the number of heads
    grid = fig.add_gridspec(nrows, cols + 1, width_ratios=[1] * cols + [0.08],
                            left=0.4 / width, right=1 - 0.65 / width, bottom=0.3 / height,
                            top=1 - 0.45 / height, wspace=0.3, hspace=0.55)
    ticks = sorted({0, dk // 2, dk - 1})
    for k, kind in enumerate(kinds):
        vmin, vmax, cmap = limits[kind]
        image = None
        for h in range(H):
            r, c = k * rows_per_kind + h // cols, h % cols
            ax = fig.add_subplot(grid[r, c])
            image = ax.imshow(tensors[kind][h].numpy(), vmin=vmin, vmax=vmax, cmap=cmap,
                              interpolation="nearest")
            ax.set_title(f"{kind} head {h}", fontsize=7, pad=2)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks if c == 0 else [])
            ax.tick_params(labelsize=5, length=2, pad=1)
            if c == 0:
                ax.set_ylabel("row i", fontsize=6, labelpad=1)
            ax.set_xlabel("column j", fontsize=6, labelpad=1)
        bar = fig.colorbar(image, cax=fig.add_subplot(grid[k * rows_per_kind:(k + 1) * rows_per_kind,
                                                            cols]), extend="both")
        bar.ax.tick_params(labelsize=6)
        bar.set_label(kind, fontsize=7)
    return fig


def spread_figure(pairwise: Tensor, to_mean: Tensor, labels: Sequence[str],
                  layers: Sequence[int]):
    """How G_LM spreads across the inputs, per layer: the matrix of RMSE between each pair of
    inputs (over heads), and each head's RMSE against the inputs' mean (mean over inputs).

    pairwise [N, N, L, H], to_mean [N, L, H]."""
    n = len(layers)
    fig = _figure(2.6 * n + 1.0, 5.2)
    fig.suptitle("G_LM across inputs, per layer", fontsize=10)
    axes = fig.subplots(2, n, squeeze=False)
    pair = pairwise.pow(2).mean(dim=-1).sqrt()                  # [N, N, L]
    vmax = max(float(pair[:, :, list(layers)].max()), 1e-300)
    short = [s if len(s) <= 12 else s[:11] + "…" for s in labels]
    image = None
    for c, l in enumerate(layers):
        ax = axes[0, c]
        image = ax.imshow(pair[:, :, l].numpy(), vmin=0, vmax=vmax, cmap="magma",
                          interpolation="nearest")
        ax.set_title(f"layer {l}: RMSE between inputs", fontsize=7)
        ticks = np.arange(len(labels))
        ax.set_xticks(ticks, short, rotation=90, fontsize=5)
        ax.set_yticks(ticks, short, fontsize=5)
        ax.set_xlabel("input", fontsize=6)
        ax.set_ylabel("input", fontsize=6)
        ax = axes[1, c]
        per_head = to_mean[:, l].mean(dim=0).numpy()            # [H]
        ax.bar(np.arange(len(per_head)), per_head, color="tab:blue")
        ax.set_xticks(np.arange(len(per_head)))
        ax.set_title(f"layer {l}: RMSE to the mean", fontsize=7)
        ax.set_xlabel("head", fontsize=6)
        ax.set_ylabel("RMSE", fontsize=6)
        ax.tick_params(labelsize=5)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    bar.ax.tick_params(labelsize=6)
    bar.set_label("RMSE", fontsize=7)
    return fig


def spectrum_figure(singular: Tensor, layers: Sequence[int]):
    """Singular values of G_LM per layer (one line per head, mean over inputs, log scale):
    a steep first drop means G_LM is close to rank one. singular [N, L, H, dk].

    One legend below the panels names the heads (their colours are the same in every
    panel)."""
    n = len(layers)
    s = singular.mean(dim=0)                                    # [L, H, dk]
    H = s.shape[1]
    legend_rows = math.ceil(H / 8)
    fig = _figure(2.6 * n + 0.6, 2.8 + 0.2 * legend_rows)
    fig.suptitle("singular values of G_LM (mean over inputs)", fontsize=10)
    axes = fig.subplots(1, n, squeeze=False)[0]
    colours = line_colours(H)
    for ax, l in zip(axes, layers):
        for h in range(H):
            ax.plot(np.arange(1, s.shape[2] + 1), s[l, h].clamp_min(1e-300).numpy(),
                    linewidth=0.8, color=colours[h], label=f"head {h}")
        ax.set_yscale("log")
        ax.set_title(f"layer {l}", fontsize=7)
        ax.set_xlabel("index", fontsize=6)
        ax.set_ylabel("singular value", fontsize=6)
        ax.tick_params(labelsize=5)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(H, 8), fontsize=6,
               frameon=False, handlelength=1.5, columnspacing=1.0)
    return fig
