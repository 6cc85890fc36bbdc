"""The numbers of `pldr inspect`: how much G_LM varies between inputs (invariance), its
determinant and singular values (spectra), and what the caches change.

All functions take float64 tensors and return tensors; `build_report` turns them into the
JSON-ready dict of report.json (per layer at least `G_LM_rmse` and `cache_max_diff`; the
fields are listed in docs/inspect.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .collect import InputDeductive


@dataclass(frozen=True)
class Invariance:
    """How G_LM [N, L, H, dk, dk] of N inputs spreads (RMSE: root mean square over entries)."""

    pairwise: Tensor  # [N, N, L, H] RMSE between input i and input j
    to_mean: Tensor   # [N, L, H] RMSE of each input against the inputs' mean
    rms: Tensor       # [L, H] root mean square of the mean G_LM (the scale to compare with)


def invariance(G: Tensor) -> Invariance:
    """Pairwise and against-the-mean RMSE of G [N, L, H, dk, dk]; one pair at a time, so
    memory stays at one [N, L, H, dk, dk] difference."""
    mean = G.mean(dim=0)                                                   # [L, H, dk, dk]
    rmse = lambda d: d.pow(2).mean(dim=(-1, -2)).sqrt()                    # noqa: E731
    pairwise = torch.stack([rmse(G - G[i]) for i in range(G.shape[0])])    # [N, N, L, H]
    return Invariance(pairwise, rmse(G - mean), mean.pow(2).mean(dim=(-1, -2)).sqrt())


def between_inputs(pairwise: Tensor) -> Tensor:
    """RMSE between the inputs, [L, H]: the root mean square over all pairs i < j of the
    pairwise RMSE (0 for a single input: there is nothing to differ from)."""
    N = pairwise.shape[0]
    if N < 2:
        return torch.zeros(pairwise.shape[2:], dtype=pairwise.dtype)
    i, j = torch.triu_indices(N, N, offset=1)
    return pairwise[i, j].pow(2).mean(dim=0).sqrt()


@dataclass(frozen=True)
class Spectra:
    """Determinant and singular values of each [dk, dk] matrix of a [..., dk, dk] tensor."""

    sign: Tensor       # [...] sign of det (0 for a singular matrix)
    logabsdet: Tensor  # [...] log |det|
    singular: Tensor   # [..., dk] singular values, largest first
    top_share: Tensor  # [...] largest singular value / their sum (1: rank one)


def spectra(M: Tensor) -> Spectra:
    """det, log|det| and singular values of M [..., dk, dk] (float64 for stable numbers)."""
    M = M.double()
    sign, logabsdet = torch.linalg.slogdet(M)
    s = torch.linalg.svdvals(M)
    return Spectra(sign, logabsdet, s, s[..., 0] / s.sum(dim=-1).clamp_min(1e-300))


def det_of(sign: float, logabsdet: float) -> float | None:
    """sign * exp(log|det|) as a JSON number; None where it over- or underflows a double."""
    if sign == 0:
        return 0.0
    if not math.isfinite(logabsdet) or abs(logabsdet) > 700:
        return None
    return sign * math.exp(logabsdet)


def _num(x: float) -> float | None:
    """A float for JSON (which has no inf or nan)."""
    x = float(x)
    return x if math.isfinite(x) else None


def build_report(items: Sequence[InputDeductive], layers: Sequence[int],
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json dict for the collected inputs, over the chosen layers."""
    G = torch.stack([it.G_LM for it in items])                  # [N, L, H, dk, dk]
    inv = invariance(G)
    between = between_inputs(inv.pairwise)                      # [L, H]
    spec = spectra(G)                                           # [N, L, H](, dk)
    cache = torch.stack([it.cache_diff for it in items]).amax(dim=0)  # [L, H]
    H = G.shape[2]
    out_layers = []
    for l in layers:
        msd_to_mean = inv.to_mean[:, l].pow(2).mean()
        rms = inv.rms[l].pow(2).mean().sqrt()
        rmse = between[l].pow(2).mean().sqrt()
        heads = []
        for h in range(H):
            heads.append({
                "head": h,
                "G_LM_rmse": _num(between[l, h]),
                "G_LM_rmse_to_mean": [_num(v) for v in inv.to_mean[:, l, h]],
                "G_LM_rms": _num(inv.rms[l, h]),
                "det": [det_of(float(s), float(d)) for s, d in
                        zip(spec.sign[:, l, h], spec.logabsdet[:, l, h])],
                "logabsdet": [_num(v) for v in spec.logabsdet[:, l, h]],
                "singular_values": [[_num(v) for v in sv] for sv in spec.singular[:, l, h]],
                "top_singular_share": [_num(v) for v in spec.top_share[:, l, h]],
                "cache_max_diff": _num(cache[l, h]),
            })
        out_layers.append({
            "layer": l,
            "G_LM_rmse": _num(rmse),
            "G_LM_rmse_to_mean": _num(msd_to_mean.sqrt()),
            "G_LM_rms": _num(rms),
            "G_LM_rel_rmse": _num(rmse / rms) if rms > 0 else None,
            "pairwise_rmse": [[_num(v) for v in row] for row in
                              inv.pairwise[:, :, l].pow(2).mean(dim=-1).sqrt()],
            "logabsdet_mean": _num(spec.logabsdet[:, l].mean()),
            "top_singular_share_mean": _num(spec.top_share[:, l].mean()),
            "cache_max_diff": _num(cache[l].max()),
            "heads": heads,
        })
    return {
        **(meta or {}),
        "inputs": [{"label": it.label, "ids": it.ids, "num_tokens": len(it.ids)} for it in items],
        "kinds": list(items[0].kinds()),
        "layers": out_layers,
        "definitions": DEFINITIONS,
    }


DEFINITIONS = {
    "G_LM_rmse": "RMSE of G_LM between the inputs: root mean square over all pairs of inputs "
                 "(and, per layer, over heads) of the entrywise difference; 0 for one input",
    "G_LM_rmse_to_mean": "RMSE of each input's G_LM against the inputs' mean G_LM",
    "G_LM_rms": "root mean square of the entries of the inputs' mean G_LM (the scale)",
    "G_LM_rel_rmse": "G_LM_rmse / G_LM_rms",
    "det": "det(G_LM) per input (null where it over- or underflows a double)",
    "logabsdet": "log |det(G_LM)| per input",
    "singular_values": "singular values of G_LM per input, largest first",
    "top_singular_share": "largest singular value / sum of singular values (1: rank one)",
    "cache_max_diff": "largest |cached - uncached| over A, A_LM, A_P, G_LM after the input is "
                      "prefilled as a prompt in the kv_g, kv_only and g_only cache modes",
}


def headline_rows(report: dict[str, Any]) -> list[list[str]]:
    """The terminal table: one row per layer of the report's headline numbers."""
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    rows = [["layer", "G_LM rmse", "relative", "to mean", "top s share", "log|det|",
             "cache diff"]]
    for L in report["layers"]:
        rows.append([str(L["layer"]), fmt(L["G_LM_rmse"], ".3e"), fmt(L["G_LM_rel_rmse"], ".3e"),
                     fmt(L["G_LM_rmse_to_mean"], ".3e"), fmt(L["top_singular_share_mean"], ".3f"),
                     fmt(L["logabsdet_mean"], ".2f"), fmt(L["cache_max_diff"], ".1e")])
    return rows
