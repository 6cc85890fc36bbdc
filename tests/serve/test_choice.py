"""A choice's text as ids arrive (pldr.serve.app.Choice): decoded incrementally, it equals
decoding all the ids at once, and the streamed pieces join to it."""

from __future__ import annotations

import random

import pytest
from pydoc_data.topics import topics

from pldr.data.tokenizer import Tokenizer
from pldr.serve.app import Choice


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("choice")
    return Tokenizer.train([topics[k] for k in sorted(topics)[:60]], 400, str(root / "tok"))


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, stops=()) -> tuple[Choice, str]:
    choice, shown, at = Choice(tok, stops, eos_id=-1), [], 0
    while at < len(ids) and not choice.done:
        step = rng.randint(1, 3)
        choice.add(ids[at:at + step], at + step >= len(ids))
        shown.append(choice.new_text())
        at += step
    return choice, "".join(shown)


def test_incremental_text_equals_decoding_everything(tok):
    rng = random.Random(0)
    text = "".join(topics[k] for k in sorted(topics)[60:64])
    byte_ids = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "é€😀".encode()]  # byte fallback
    cases = [tok.encode(text)[:300],                                  # real text
             [rng.randrange(6, 400) for _ in range(300)],             # random pieces
             byte_ids + tok.encode("a word")[:3] + byte_ids[:2]]      # split characters
    for ids in cases:
        choice, shown = _stream(tok, ids, rng)
        assert choice.text == tok.decode(ids) == shown


def test_a_stop_string_cuts_the_incremental_text(tok):
    ids = tok.encode("the first line. the second line.")
    choice, shown = _stream(tok, ids, random.Random(1), stops=("second",))
    assert choice.stopped and choice.text == tok.decode(ids).split("second")[0] == shown
