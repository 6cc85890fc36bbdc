"""Synthetic fine-tuning data written from the built-in corpus (pydoc_data.topics), where
the right answer is planted: a word decides the label, capitalised names are the entities, a
planted name is the answer, and a completion repeats its prompt's first word."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SMALL = dict(num_layers=1, d_model=32, num_heads=2, dff=64, num_reslayerA=1, num_denseA=1,
             A_dff=16, max_seq_len=64)
NAMES = ("Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farid", "Hiro", "Ingrid")


def corpus_words(n: int = 4000) -> list[str]:
    """Lower-case words of the built-in corpus, in order."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return re.findall(r"\b[a-z]{3,9}\b", text)[:n]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)



def sequence_rows(n: int, seed: int) -> list[dict]:
    """Short lower-case corpus snippets; label 1 exactly when the planted word "XYZ" is in
    it (its capitals, pieces no snippet has otherwise, are the clue)."""
    rng, words = random.Random(seed), corpus_words()
    rows = []
    for i in range(n):
        start = rng.randrange(len(words) - 8)
        snippet = words[start:start + rng.randrange(4, 8)]
        label = i % 2
        if label:
            snippet.insert(rng.randrange(len(snippet) + 1), "XYZ")
        rows.append({"text": " ".join(snippet), "label": label})
    return rows


def token_rows(n: int, seed: int) -> list[dict]:
    """Corpus words with capitalised names planted; a name is a PER entity (B-PER)."""
    rng, words = random.Random(seed), corpus_words()
    rows = []
    for _ in range(n):
        start = rng.randrange(len(words) - 8)
        tokens = words[start:start + rng.randrange(4, 7)]
        tags = [0] * len(tokens)
        for _ in range(rng.randrange(1, 3)):
            k = rng.randrange(len(tokens) + 1)
            tokens.insert(k, rng.choice(NAMES))
            tags.insert(k, 1)
        rows.append({"tokens": tokens, "ner_tags": [["O", "B-PER"][t] for t in tags]})
    return rows


def qa_rows(n: int, seed: int) -> list[dict]:
    """A context of corpus words with one planted name; "who" asks for it."""
    rng, words = random.Random(seed), corpus_words()
    rows = []
    for _ in range(n):
        start = rng.randrange(len(words) - 10)
        ctx_words = words[start:start + rng.randrange(5, 9)]
        k = rng.randrange(len(ctx_words) + 1)
        name = rng.choice(NAMES)
        before = " ".join(ctx_words[:k])
        context = (before + " " if before else "") + name + " " + " ".join(ctx_words[k:])
        answer_start = len(before) + (1 if before else 0)
        rows.append({"question": "who", "context": context.strip(),
                     "answers": {"text": [name], "answer_start": [answer_start]}})
    return rows


def causal_rows(n: int, seed: int) -> list[dict]:
    """A prompt of corpus words; the completion repeats its first word."""
    rng, words = random.Random(seed), corpus_words()
    rows = []
    for _ in range(n):
        start = rng.randrange(len(words) - 6)
        prompt = words[start:start + 4]
        rows.append({"prompt": " ".join(prompt) + " :", "completion": " " + prompt[0]})
    return rows
