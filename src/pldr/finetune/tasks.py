"""Fine-tuning data per task: rows of a table (local JSONL/CSV/parquet or `hf:` datasets,
read by `pldr.data.load_table`) become encoded examples, checked row by row before anything
is written, and examples become right-padded batches.

    sequence-classification  text  -> ids + EOS,                     label     (IMDb: text, label)
    token-classification     words -> pieces of each word + EOS,     a word's tag on its first
                                                                      piece, -100 on the rest
                                                                      (CoNLL-2003: tokens, ner_tags)
    question-answering       question + context window + EOS,        start/end piece of the
                                                                      answer (SQuAD: question,
                                                                      context, answers), windows
                                                                      of a long context overlap
                                                                      by --doc-stride pieces
    causal                   prompt pieces + completion pieces + EOS, the loss on the
                                                                      completion (and EOS) only

Batches are dicts of LongTensors: `ids` [b, T], `attention_mask` [b, T] (1 = real), and
`labels` [b] or [b, T] (-100 ignored), or `start_positions`/`end_positions` [b]; causal
batches also carry `loss_mask` [b, T] (1 = a completion position, whose next-token target
counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import DataError
from ..model.heads import question_answering_input

IGNORE = -100  # a label position that counts for nothing (transformers' convention)
TASKS = ("sequence-classification", "token-classification", "question-answering", "causal")
# column roles of each task and their defaults (IMDb, CoNLL-2003, SQuAD, prompt/completion)
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "sequence-classification": {"text": "text", "label": "label"},
    "token-classification": {"tokens": "tokens", "tags": "ner_tags"},
    "question-answering": {"question": "question", "context": "context", "answers": "answers"},
    "causal": {"prompt": "prompt", "completion": "completion"},
}


@dataclass
class Example:
    """One encoded row (or one window of a long QA context).

    `ids` are the model's input; `label` a class id (sequence), `labels` per position (token,
    causal: -100 where nothing is learned); `start`/`end` the answer's piece positions (QA, 0
    and 0 when the window lacks the answer). `row` is the table row it came from; `words`
    (token) are the first-piece position of each word (-1: cut off); `spans` (QA) each
    piece's character span in the context (None outside the context)."""

    ids: list[int]
    row: int
    label: int | float | None = None
    labels: list[int] | None = None
    start: int = 0
    end: int = 0
    words: list[int] | None = None
    spans: list[tuple[int, int] | None] | None = None


@dataclass
class TaskData:
    """A split's encoded examples and what evaluation needs of its rows: `gold` (labels,
    tag-name lists, or answer-text lists per row) and `contexts` (QA)."""

    examples: list[Example]
    rows: int
    gold: list[Any] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)


def columns_of(task: str, given: dict[str, str | None]) -> dict[str, str]:
    """The column names of `task`: the task's defaults, overridden by the given flags."""
    cols = dict(DEFAULT_COLUMNS[task])
    cols.update({k: v for k, v in given.items() if k in cols and v})
    return cols


def check_columns(table: Any, cols: dict[str, str], what: str) -> None:
    """Every column the task reads exists in `table`, else one line naming the setting
    (`text_column`, ...) that picks it."""
    for role, name in cols.items():
        if name not in table.column_names:
            raise DataError(f"{what} has no column {name!r} ({role}); its columns are "
                            f"{', '.join(table.column_names)}: name it with "
                            f"`{role}_column`")


def label_names(table: Any, column: str, sequence: bool) -> list[str] | None:
    """The label names a `datasets` ClassLabel column carries (CoNLL-2003's ner_tags: a
    sequence of ClassLabel), else None."""
    feature = table.features.get(column)
    if sequence:
        feature = getattr(feature, "feature", None)
    names = getattr(feature, "names", None)
    return list(names) if names else None


def string_labels(values: Sequence[Any]) -> list[str] | None:
    """Sorted distinct labels when they are strings (names given in the data), else None."""
    flat = [v for v in values if v is not None]
    if flat and all(isinstance(v, str) for v in flat):
        return sorted(set(flat))
    return None


def _label_id(value: Any, label2id: dict[str, int], num_labels: int, where: str) -> int:
    """A class id in [0, num_labels) from an int or a label name."""
    if isinstance(value, str):
        if value not in label2id:
            raise DataError(f"{where}: label {value!r} is not one of the model's labels "
                            f"{sorted(label2id)}")
        return label2id[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not a class id (an integer) or name")
    if not 0 <= value < num_labels:
        raise DataError(f"{where}: label {value} is outside the {num_labels} labels "
                        f"[0, {num_labels}); fix the data or pass `num_labels`")
    return value


def _fit(ids: list[int], max_len: int, eos: int) -> list[int]:
    """Ids cut to max_len - 1, then EOS appended (every text ends with EOS, as trained)."""
    return ids[:max_len - 1] + [eos]


# ----- encoding, one function per task ----------------------------------------------------------


def encode_sequence(table: Any, cols: dict[str, str], tok: Any, max_len: int,
                    label2id: dict[str, int], num_labels: int, what: str) -> TaskData:
    """Text -> ids + EOS; its label checked against the model's labels."""
    texts, labels = table[cols["text"]], table[cols["label"]]
    examples, gold = [], []
    for i, (text, value) in enumerate(zip(texts, labels)):
        where = f"row {i} of {what}"
        if not isinstance(text, str):
            raise DataError(f"{where}: column {cols['text']!r} holds {type(text).__name__}, "
                            "not text; name the text column with `text_column`")
        if num_labels == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
            label: int | float = float(value)  # regression
        else:
            label = _label_id(value, label2id, num_labels, where)
        examples.append(Example(_fit(tok.encode(text, eos=False), max_len, tok.eos_id), i,
                                label=label))
        gold.append(label)
    return TaskData(examples, len(texts), gold)


def encode_tokens(table: Any, cols: dict[str, str], tok: Any, max_len: int,
                  label2id: dict[str, int], num_labels: int, what: str) -> TaskData:
    """Words -> the pieces of each word + EOS; a word's tag on its first piece, -100 on the
    rest of its pieces and on EOS. Words past max_len are cut off (scored as "O")."""
    id2name = {v: k for k, v in label2id.items()}
    examples, gold = [], []
    for i, (words, tags) in enumerate(zip(table[cols["tokens"]], table[cols["tags"]])):
        where = f"row {i} of {what}"
        if not isinstance(words, list) or not isinstance(tags, list):
            raise DataError(f"{where}: columns {cols['tokens']!r} and {cols['tags']!r} must "
                            "hold lists (words and their tags)")
        if len(words) != len(tags):
            raise DataError(f"{where}: {len(words)} words but {len(tags)} tags; each word "
                            "needs exactly one tag")
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        tag_ids = [_label_id(t, label2id, num_labels, where) for t in tags]
        for word, tag in zip(words, tag_ids):
            if not isinstance(word, str):
                raise DataError(f"{where}: word {word!r} is not text")
            pieces = tok.encode(word, eos=False)
            if not pieces or len(ids) + len(pieces) > max_len - 1:
                starts.append(-1)
                continue
            starts.append(len(ids))
            ids += pieces
            labels += [tag] + [IGNORE] * (len(pieces) - 1)
        examples.append(Example(ids + [tok.eos_id], i, labels=labels + [IGNORE], words=starts))
        gold.append([id2name.get(t, str(t)) for t in tag_ids])
    return TaskData(examples, len(gold), gold)


def encode_qa(table: Any, cols: dict[str, str], tok: Any, max_len: int, stride: int | None,
              what: str) -> TaskData:
    """Question + a window of the context + EOS per example; a context longer than the
    window gives several windows, each starting `stride` pieces before the last one's end.
    The answer's first and last piece are the labels (0, 0 where a window lacks it)."""
    examples, gold, contexts = [], [], []
    for i, (q, ctx, ans) in enumerate(zip(table[cols["question"]], table[cols["context"]],
                                          table[cols["answers"]])):
        where = f"row {i} of {what}"
        if not isinstance(q, str) or not isinstance(ctx, str):
            raise DataError(f"{where}: question and context must be text")
        texts, starts = _answers(ans, cols["answers"], where)
        for text, a in zip(texts, starts):
            if a < 0 or a + len(text) > len(ctx):
                raise DataError(f"{where}: the answer {text!r} at character {a} falls outside "
                                f"its context of {len(ctx)} characters; fix answer_start")
        q_ids = tok.encode(q, eos=False)[:max(1, max_len // 2)]
        c_ids, c_spans = tok.encode_with_offsets(ctx)
        room = max_len - len(q_ids) - 1
        stride = room // 3 if stride is None else stride
        if stride >= room:
            raise DataError(f"`doc_stride` {stride} must be smaller than the context window "
                            f"of {room} pieces (max length {max_len} less the question)")
        a_first, a_last = _answer_pieces(c_spans, starts[0], starts[0] + len(texts[0])) \
            if texts else (-1, -1)
        lo = 0
        while True:
            hi = min(lo + room, len(c_ids))
            offset = len(q_ids) - lo
            inside = texts and a_first >= lo and 0 <= a_last < hi
            ids, _ = question_answering_input(q_ids, c_ids[lo:hi], tok.eos_id)
            examples.append(Example(
                ids, i,
                start=a_first + offset if inside else 0, end=a_last + offset if inside else 0,
                spans=[None] * len(q_ids) + list(c_spans[lo:hi]) + [None]))
            if hi >= len(c_ids):
                break
            lo = hi - stride
        gold.append(texts)
        contexts.append(ctx)
    return TaskData(examples, len(gold), gold, contexts)


def _answers(ans: Any, column: str, where: str) -> tuple[list[str], list[int]]:
    """SQuAD's answers field {"text": [...], "answer_start": [...]} as two lists."""
    if not isinstance(ans, dict) or not {"text", "answer_start"} <= set(ans):
        raise DataError(f"{where}: column {column!r} must hold {{'text': [...], "
                        f"'answer_start': [...]}} (SQuAD's answers), got {ans!r}"[:300])
    texts, starts = list(ans["text"]), list(ans["answer_start"])
    if len(texts) != len(starts) or not all(isinstance(a, int) for a in starts):
        raise DataError(f"{where}: the answers need one integer answer_start per text")
    return texts, starts


def _answer_pieces(spans: list[tuple[int, int]], a: int, b: int) -> tuple[int, int]:
    """The first and last piece overlapping the characters [a, b) (-1 if none)."""
    hit = [k for k, (s, e) in enumerate(spans) if e > s and s < b and e > a]
    return (hit[0], hit[-1]) if hit else (-1, -1)


def encode_causal(table: Any, cols: dict[str, str], tok: Any, max_len: int,
                  what: str) -> TaskData:
    """Prompt pieces + completion pieces + EOS; `labels` are the ids themselves (the next
    token targets) and `start` the prompt's length: the loss counts only targets from
    `start` on (collate's `loss_mask`), so prompt tokens never count, whatever their labels.
    Long rows lose their completion's end."""
    examples = []
    for i, (prompt, completion) in enumerate(zip(table[cols["prompt"]],
                                                 table[cols["completion"]])):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"row {i} of {what}: prompt and completion must be text")
        p = tok.encode(prompt, eos=False)
        c = tok.encode(completion, eos=False) + [tok.eos_id]
        ids = (p + c)[:max_len]
        if len(p) >= len(ids):
            raise DataError(f"row {i} of {what}: the prompt fills all {max_len} positions; "
                            "shorten it or raise `max_length`")
        examples.append(Example(ids, i, labels=list(ids), start=len(p)))
    return TaskData(examples, len(examples))


# ----- batches ------------------------------------------------------------------------------------


def collate(task: str, examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors of a list of examples (see the module docstring)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        mask[r, :len(e.ids)] = 1
    batch = {"ids": ids, "attention_mask": mask}
    if task == "sequence-classification":
        float_labels = any(isinstance(e.label, float) for e in examples)
        batch["labels"] = torch.tensor([e.label for e in examples],
                                       dtype=torch.float32 if float_labels else torch.long)
    elif task in ("token-classification", "causal"):
        labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
        for r, e in enumerate(examples):
            labels[r, :len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
        if task == "causal":
            pos = torch.arange(T)[None]                                       # [1, T]
            start = torch.tensor([e.start for e in examples])[:, None]        # [b, 1]
            batch["loss_mask"] = ((pos >= start) & (mask > 0)).long()
    else:
        batch["start_positions"] = torch.tensor([e.start for e in examples])
        batch["end_positions"] = torch.tensor([e.end for e in examples])
    return batch


def loss_items(task: str, batch: dict[str, Tensor]) -> int:
    """How many items a batch's mean loss averages over (rows, or labelled positions; for
    causal, the labelled next-token targets), which weighs its gradient in a global step."""
    if task == "token-classification":
        return int((batch["labels"] != IGNORE).sum())
    if task == "causal":
        return int(batch["loss_mask"][:, 1:].sum())
    return int(batch["ids"].shape[0])


__all__ = ["IGNORE", "TASKS", "DEFAULT_COLUMNS", "Example", "TaskData", "columns_of",
           "check_columns", "label_names", "string_labels", "encode_sequence",
           "encode_tokens", "encode_qa", "encode_causal", "collate", "loss_items"]
