"""index.html of `pldr inspect`: every picture with the numbers that go with it, in one
self-contained page (pictures referenced by relative path, no scripts)."""

from __future__ import annotations

import html
import os
from typing import Any

from ..files import atomic_write_text

_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1600px}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee} img{max-width:100%;border:1px solid #ddd;margin:.3em 0}
code{background:#f4f4f4}"""


def _fmt(v: Any, f: str = ".3e") -> str:
    return "n/a" if v is None else format(v, f)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(src: str, alt: str) -> str:
    """A picture: shown inline (PNG, SVG), or a link to it (PDF, which `img` cannot show)."""
    if src.endswith(".pdf"):
        return f'<p><a href="{html.escape(src)}">{html.escape(alt)} (PDF)</a></p>'
    return f'<p><img src="{html.escape(src)}" alt="{html.escape(alt)}"></p>'


def write_index(path: str | os.PathLike, report: dict[str, Any], headline: list[list[str]]) -> None:
    """Write the page for `report` (with its `pictures` entry) to `path`."""
    pics = report["pictures"]
    inputs = report["inputs"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>pldr inspect</title>"
             f"<style>{_STYLE}</style></head><body><h1>Deductive outputs</h1>"]
    model = report.get("model", {})
    parts.append(f"<p>model <code>{html.escape(str(model.get('path', '')))}</code>, variant "
                 f"{html.escape(str(model.get('variant', '')))}, dtype "
                 f"{html.escape(str(report.get('dtype', '')))}</p>")
    parts.append(_table(["input", "tokens", "ids"],
                        [[i["label"], str(i["num_tokens"]),
                          ",".join(map(str, i["ids"][:24])) + (" …" if len(i["ids"]) > 24 else "")]
                         for i in inputs]))
    parts.append("<h2>Headline numbers</h2>" + _table(headline[0], headline[1:]))
    parts.append("<dl>" + "".join(f"<dt><code>{html.escape(k)}</code></dt><dd>{html.escape(v)}</dd>"
                                  for k, v in report["definitions"].items()) + "</dl>")
    parts.append("<h2>G_LM across inputs</h2>" + _img(pics["spread"], "G_LM spread"))
    parts.append(_img(pics["spectrum"], "G_LM singular values"))
    for layer in report["layers"]:
        l = layer["layer"]
        parts.append(f"<h2>Layer {l}</h2>")
        rows = []
        for h in layer["heads"]:
            rows.append([str(h["head"]), _fmt(h["G_LM_rmse"]),
                         " ".join(_fmt(v) for v in h["G_LM_rmse_to_mean"]),
                         _fmt(h["G_LM_rms"]),
                         " ".join(_fmt(v, ".3g") for v in h["det"]),
                         " ".join(_fmt(v, ".2f") for v in h["logabsdet"]),
                         " ".join(_fmt(v, ".3f") for v in h["top_singular_share"]),
                         " ".join(_fmt(sv[0], ".3g") for sv in h["singular_values"]),
                         _fmt(h["cache_max_diff"], ".1e")])
        parts.append(_table(["head", "G_LM rmse", "rmse to mean (per input)", "G_LM rms",
                             "det (per input)", "log|det|", "top s share", "top s",
                             "cache diff"], rows))
        for i, inp in enumerate(inputs):
            parts.append(f"<h3>{html.escape(inp['label'])}, layer {l}</h3>")
            parts.append(_img(pics["heatmaps"][i][str(l)], f"{inp['label']} layer {l}"))
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
