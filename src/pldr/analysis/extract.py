"""The mean G_LM (and A_LM) of a model over chunks of a data source: the predefined G_LM of
the v510Gi ablation (one G_LM in place of the deep metric network), with its spread.

Chunks are streamed in batches and only running moments are kept (count, mean and the sum
of squared deviations per entry, merged batch by batch in float64 as Chan et al. do), so
memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..data.chunks import Chunks
from ..data.tokenizer import Tokenizer
from ..data.tokens import load_tokens
from ..errors import DataError, PLDRError
from ..model.model import PLDRModel

log = logging.getLogger("pldr")


@dataclass
class RunningMoments:
    """Entrywise count, mean and sum of squared deviations (M2) of a stream of tensors."""

    count: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None

    def add(self, batch: Tensor) -> None:
        """Merge a batch [B, ...] (float64) into the moments."""
        b = batch.shape[0]
        b_mean = batch.mean(dim=0)
        b_m2 = (batch - b_mean).pow(2).sum(dim=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = b, b_mean, b_m2
            return
        n = self.count + b
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + b_m2 + delta.pow(2) * (self.count * b / n)
        self.count = n

    @property
    def std(self) -> Tensor:
        """Population standard deviation per entry."""
        return (self.m2 / self.count).sqrt()


@dataclass(frozen=True)
class ExtractedG:
    """The mean deductive outputs over `samples` chunks, each [L, H, dk, dk] float64."""

    G_LM: Tensor
    G_LM_std: Tensor
    A_LM: Tensor | None  # None for a v510G model (it has no A_LM)
    A_LM_std: Tensor | None
    samples: int
    tokens: int


def data_chunks(data: str, tokenizer: Tokenizer, context_length: int, samples: int, *,
                split: str | None = "train", text_column: str | None = None,
                mode: str = "pack", progress: bool = False) -> Chunks:
    """The first `samples` chunks of `context_length` tokens of a data source, chunked as
    for training (documents end with EOS; `pack` cuts the token stream evenly)."""
    if samples < 1:
        raise DataError(f"`samples` must be at least 1, got {samples}")
    docs = load_tokens(data, tokenizer, split, text_column, progress=progress)
    chunks = Chunks.from_tokens(docs, context_length, mode)
    if len(chunks) < samples:
        raise DataError(f"{data!r} has only {len(chunks)} chunks of {context_length} tokens; "
                        "lower `samples` or `context_length`")
    return Chunks(chunks.tokens, chunks.starts[:samples], chunks.lengths[:samples],
                  chunks.chunk_len)


def chunk_batches(chunks: Chunks, batch_size: int) -> Iterator[Tensor]:
    """LongTensor batches [<= batch_size, chunk_len] of the chunks in order."""
    if batch_size < 1:
        raise PLDRError(f"`batch_size` must be at least 1, got {batch_size}")
    for s in range(0, len(chunks), batch_size):
        yield torch.from_numpy(chunks.rows(np.arange(s, min(s + batch_size, len(chunks)))))


@torch.inference_mode()
def extract_G_LM(model: PLDRModel, batches: Iterable[Tensor]) -> ExtractedG:
    """Mean and spread of G_LM (and A_LM) over every row of `batches` ([B, T] each), one
    full forward per batch; each row's own A (pads left out) gives its own G_LM."""
    G, A = RunningMoments(), RunningMoments()
    tokens = 0
    for ids in batches:
        ids = ids.to(model.device)
        ded = model(ids, return_deductive=True, logits_to_keep=1).deductive
        G.add(ded.G_LM.transpose(0, 1).double())                  # [B, L, H, dk, dk]
        if ded.A_LM is not None:
            A.add(ded.A_LM.transpose(0, 1).double())
        tokens += int((ids != model.config.pad_id).sum())
        log.info("extract-G: %d chunks", G.count)
    if G.count == 0:
        raise DataError("no chunks to average over; give at least one sample")
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return ExtractedG(G.mean.cpu(), G.std.cpu(), cpu(A.mean), None if A.m2 is None else
                      A.std.cpu(), G.count, tokens)


def spread_report(result: ExtractedG) -> dict[str, Any]:
    """Per layer and head: RMS of the mean G_LM and the RMS deviation of the chunks' G_LM
    from it (the entrywise standard deviation, root-mean-squared), also relative."""
    def rms(t: Tensor) -> Tensor:  # [L, H, dk, dk] -> [L, H]
        return t.pow(2).mean(dim=(-1, -2)).sqrt()

    layers = []
    g_rms, g_dev = rms(result.G_LM), rms(result.G_LM_std)
    a_rms = None if result.A_LM is None else rms(result.A_LM)
    a_dev = None if result.A_LM_std is None else rms(result.A_LM_std)
    for l in range(g_rms.shape[0]):
        entry = {"layer": l,
                 "G_LM_rms": float(g_rms[l].pow(2).mean().sqrt()),
                 "G_LM_rmse_to_mean": float(g_dev[l].pow(2).mean().sqrt()),
                 "heads": [{"head": h, "G_LM_rms": float(g_rms[l, h]),
                            "G_LM_rmse_to_mean": float(g_dev[l, h])}
                           for h in range(g_rms.shape[1])]}
        entry["G_LM_rel_rmse"] = (entry["G_LM_rmse_to_mean"] / entry["G_LM_rms"]
                                  if entry["G_LM_rms"] > 0 else None)
        if a_rms is not None:
            entry["A_LM_rms"] = float(a_rms[l].pow(2).mean().sqrt())
            entry["A_LM_rmse_to_mean"] = float(a_dev[l].pow(2).mean().sqrt())
            for h, head in enumerate(entry["heads"]):
                head["A_LM_rms"], head["A_LM_rmse_to_mean"] = float(a_rms[l, h]), float(a_dev[l, h])
        layers.append(entry)
    return {"samples": result.samples, "tokens": result.tokens, "layers": layers,
            "definitions": {
                "G_LM_rms": "root mean square of the entries of the mean G_LM",
                "G_LM_rmse_to_mean": "RMSE of the chunks' G_LM against the mean (entrywise "
                                     "population standard deviation, root-mean-squared)",
                "G_LM_rel_rmse": "G_LM_rmse_to_mean / G_LM_rms"}}
