"""Evaluation metrics of fine-tuned models, each by its usual definition:

- classification: accuracy, and macro-F1 (the unweighted mean of each label's F1 over the
  labels that occur in the gold labels or the predictions, as scikit-learn's "macro");
- named entities: entity-level precision, recall and F1 of seqeval (an entity counts only
  when its type and its whole span match; BIO/IOB tags);
- extractive QA: exact match and token F1 of the SQuAD v1.1 evaluation, best over a
  question's gold answers, after SQuAD's normalisation (lower case, no punctuation, no
  articles a/an/the, single spaces), in percent;
- causal: perplexity, exp of the mean cross-entropy over completion tokens.

Which figure chooses the best checkpoint is `BEST_METRIC`'s default per task; `higher_is_better`
says which way a figure improves.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

BEST_METRIC = {"sequence-classification": "accuracy", "token-classification": "f1",
               "question-answering": "f1", "causal": "perplexity"}
LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better (all but loss and perplexity)."""
    return metric not in LOWER_IS_BETTER


def classification_metrics(gold: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids against gold ones."""
    if len(gold) != len(pred) or not gold:
        raise ValueError("classification_metrics needs as many predictions as gold labels (>0)")
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for label in sorted(set(gold) | set(pred)):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def regression_metrics(gold: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    """Mean squared error of a one-output (regression) head."""
    return {"mse": sum((g - p) ** 2 for g, p in zip(gold, pred)) / max(len(gold), 1)}


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval's default, conlleval-style) and the
    token accuracy of tag sequences."""
    from ..errors import import_extra

    seqeval = import_extra("seqeval.metrics", "finetune", "entity-level F1", "seqeval")
    tokens = sum(len(g) for g in gold)
    hits = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {"precision": float(seqeval.precision_score(gold, pred, zero_division=0)),
            "recall": float(seqeval.recall_score(gold, pred, zero_division=0)),
            "f1": float(seqeval.f1_score(gold, pred, zero_division=0)),
            "accuracy": hits / max(tokens, 1)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, the articles a/an/the removed,
    runs of whitespace made single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    """F1 of the normalised words of a prediction against one answer (as bags of words)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(answers: list[list[str]], predictions: list[str]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over a question's gold answers (a
    question without answers scores 1 for an empty prediction)."""
    em = f1 = 0.0
    for gold, pred in zip(answers, predictions):
        gold = gold or [""]
        em += max(exact_match(pred, g) for g in gold)
        f1 += max(token_f1(pred, g) if g else float(not normalize_answer(pred)) for g in gold)
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy), inf when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


__all__ = ["BEST_METRIC", "higher_is_better", "classification_metrics", "regression_metrics",
           "entity_metrics", "normalize_answer", "exact_match", "token_f1", "squad_metrics",
           "perplexity"]
