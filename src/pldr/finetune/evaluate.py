"""A task's loss on a batch (what a training step differentiates) and the evaluation of a
model on a labelled split (what `pldr finetune` logs every N steps and `pldr eval --task`
writes), on one process or shared by several.

    batch_loss(task, model, batch)  -> mean loss over the batch's items, hits, outputs
    evaluate(task, model, data)     -> {"loss", task metrics...} over the whole split
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics as M
from .tasks import IGNORE, TaskData, collate, loss_items


def _forward(task: str, model: nn.Module, batch: dict[str, Tensor]) -> Any:
    """The model's output on a batch (with the head's loss where the head computes it)."""
    if task == "causal":
        return model(batch["ids"], attention_mask=batch["attention_mask"])
    if task == "question-answering":
        return model(batch["ids"], batch["attention_mask"],
                     start_positions=batch["start_positions"],
                     end_positions=batch["end_positions"])
    return model(batch["ids"], batch["attention_mask"], labels=batch["labels"])


def batch_loss(task: str, model: nn.Module, batch: dict[str, Tensor],
               amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Any]:
    """The mean loss over the batch's items (rows, labelled positions, or completion
    targets; 0 with a zero gradient when it has none), the number of items predicted right,
    and the model's output."""
    device = batch["ids"].device
    autocast = (nullcontext() if amp_dtype is None
                else torch.autocast(device_type=device.type, dtype=amp_dtype))
    with autocast:
        out = _forward(task, model, batch)
    if task == "causal":
        logits = out.logits[:, :-1].float()                                   # [b, T-1, V]
        y = batch["labels"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, IGNORE)
        n = (y != IGNORE).sum()
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                               reduction="sum") / n.clamp(min=1)
        hits = ((logits.argmax(-1) == y) & (y != IGNORE)).sum()
        return loss, hits, out
    if task == "question-answering":
        hits = ((out.start_logits.argmax(-1) == batch["start_positions"])
                & (out.end_logits.argmax(-1) == batch["end_positions"])).sum()
        return out.loss, hits, out
    labels = batch["labels"]
    if labels.is_floating_point():                                          # regression
        return out.loss, torch.zeros((), device=device), out
    predicted = out.logits.argmax(-1)                                       # [b] or [b, T]
    hits = ((predicted == labels) & (labels != IGNORE)).sum()
    loss = out.loss if loss_items(task, batch) else out.logits.sum() * 0.0
    return loss, hits, out


@torch.no_grad()
def evaluate(task: str, model: nn.Module, data: TaskData, *, batch_size: int = 16,
             pad_id: int = 0, device: Any = None, amp_dtype: torch.dtype | None = None,
             dist: Any = None, max_answer_length: int = 30,
             id2label: list[str] | None = None) -> dict[str, float]:
    """The loss (mean over the split's items) and the task's metrics (metrics.py) of `model`
    on every example of `data`. Under torchrun (`dist`, a DistInfo), rank r scores examples
    r, r + W, ... and the ranks exchange their predictions, so every rank returns the same
    figures; every rank runs the same number of forwards (FSDP needs all of them)."""
    from ..training import distributed as ptd

    device = device or next(model.parameters()).device
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(range(rank, len(data.examples), world))
    steps = -(-len(range(0, len(data.examples), world)) // batch_size) if data.examples else 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    items = torch.zeros((), dtype=torch.float64, device=device)
    outputs: dict[int, Any] = {}
    was_training = model.training
    model.eval()
    for s in range(steps):
        idx = mine[s * batch_size:(s + 1) * batch_size]
        real = len(idx)
        idx = idx or [0]  # a rank out of examples still runs the forward, with nothing kept
        batch = {k: v.to(device) for k, v in collate(
            task, [data.examples[i] for i in idx], pad_id).items()}
        loss, _, out = batch_loss(task, model, batch, amp_dtype)
        if real:
            n = loss_items(task, batch)
            loss_sum += loss.double() * n
            items += n
            outputs.update(_predictions(task, out, batch, idx, data, max_answer_length))
    model.train(was_training)
    totals = torch.stack([loss_sum, items])
    if dist is not None:
        ptd.all_reduce_sum(totals, dist)
        outputs = _gather(outputs, dist)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"loss": loss, **_metrics(task, data, outputs, loss, id2label)}


def _predictions(task: str, out: Any, batch: dict[str, Tensor], idx: list[int],
                 data: TaskData, max_answer_length: int) -> dict[int, Any]:
    """example index -> what the metrics need of it (a class, tag ids at the word starts,
    or the best answer span's (score, first char, end char))."""
    if task == "causal":
        return {}
    if task == "sequence-classification":
        logits = out.logits.float()
        pred = logits[:, 0].tolist() if batch["labels"].is_floating_point() \
            else logits.argmax(-1).tolist()
        return dict(zip(idx, pred))
    if task == "token-classification":
        tags = out.logits.argmax(-1).tolist()                              # [b, T]
        return {i: [tags[r][w] if w >= 0 else None for w in data.examples[i].words]
                for r, i in enumerate(idx)}
    start, end = out.start_logits.float().cpu(), out.end_logits.float().cpu()  # [b, T]
    found = {}
    for r, i in enumerate(idx):
        spans = data.examples[i].spans
        inside = torch.tensor([s is not None and s[1] > s[0] for s in spans]
                              + [False] * (start.shape[1] - len(spans)))
        s_score = start[r].masked_fill(~inside, float("-inf"))
        e_score = end[r].masked_fill(~inside, float("-inf"))
        T = s_score.shape[0]
        pair = s_score[:, None] + e_score[None, :]                         # [T, T]
        allowed = torch.ones(T, T, dtype=torch.bool).triu().tril(max_answer_length - 1)
        pair = pair.masked_fill(~allowed, float("-inf"))
        best = int(pair.argmax())
        a, b = divmod(best, T)
        score = float(pair[a, b])
        found[i] = (score, spans[a][0], spans[b][1]) if score > float("-inf") else None
    return found


def _gather(outputs: dict[int, Any], dist: Any) -> dict[int, Any]:
    """Every rank's predictions on every rank."""
    if not dist.enabled:
        return outputs
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, outputs)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def _metrics(task: str, data: TaskData, outputs: dict[int, Any], loss: float,
             id2label: list[str] | None) -> dict[str, float]:
    """The task's figures from the per-example predictions."""
    if task == "causal":
        return {"perplexity": M.perplexity(loss)}
    if task == "sequence-classification":
        pred = [outputs[i] for i in range(len(data.examples))]
        if data.gold and isinstance(data.gold[0], float):
            return M.regression_metrics(data.gold, pred)
        return M.classification_metrics(data.gold, pred)
    if task == "token-classification":
        names = id2label or []
        pred = []
        for i, gold in enumerate(data.gold):
            tags = outputs[i]
            pred.append([names[t] if t is not None and t < len(names) else "O" for t in tags])
        return M.entity_metrics(data.gold, pred)
    best: dict[int, tuple[float, int, int]] = {}
    for i, found in outputs.items():
        row = data.examples[i].row
        if found is not None and (row not in best or found[0] > best[row][0]):
            best[row] = found
    texts = [data.contexts[r][best[r][1]:best[r][2]].strip() if r in best else ""
             for r in range(data.rows)]
    return M.squad_metrics(data.gold, texts)


__all__ = ["batch_loss", "evaluate"]
