"""A choice's text as ids arrive (pldr.serve.choice.Choice): decoded incrementally, it equals
decoding all the ids at once, and the streamed pieces join to it."""

from __future__ import annotations

import random

import pytest
from pydoc_data.topics import topics

from pldr.data.tokenizer import Tokenizer
from pldr.serve.choice import Choice, Scored, logprobs_json, prompt_scored, token_texts


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


def _cases(tok: Tokenizer, rng: random.Random) -> list[list[int]]:
    text = "".join(topics[k] for k in sorted(topics)[60:64])
    byte_ids = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "é€😀".encode()]  # byte fallback
    return [tok.encode(text)[:300],                                  # real text
            [rng.randrange(6, 400) for _ in range(300)],             # random pieces
            byte_ids + tok.encode("a word")[:3] + byte_ids[:2]]      # split characters


def test_incremental_text_equals_decoding_everything(tok):
    rng = random.Random(0)
    for ids in _cases(tok, rng):
        choice, shown = _stream(tok, ids, rng)
        assert choice.text == tok.decode(ids) == shown


def test_token_texts_join_to_the_decoded_text(tok):
    rng = random.Random(2)
    for ids in _cases(tok, rng):
        texts = token_texts(tok, ids)
        assert len(texts) == len(ids) and "".join(texts) == tok.decode(ids)
    byte_ids = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert token_texts(tok, byte_ids) == ["", "", "€"]  # the id that completes it has it


def _scored_stream(tok, ids, rng, stops=(), offset=0):
    """Stream ids (records: their positions) through a Choice that keeps logprobs, after
    `offset` characters of echo; returns the choice and the entries sent, after checking
    that each chunk's entries hold exactly its text."""
    choice, sent, at = Choice(tok, stops, eos_id=-1, logprobs=True, offset=offset), [], 0
    while at < len(ids) and not choice.done:
        step = rng.randint(1, 3)
        records = list(range(at, min(at + step, len(ids))))  # stand-ins for TokenLogprobs
        choice.add(ids[at:at + step], at + step >= len(ids), records)
        text, entries = choice.new_text(), choice.new_scored()
        assert "".join(e.text for e in entries) == text
        sent += entries
        at += step
    return choice, sent


def test_logprob_entries_follow_the_text_through_stop_strings_and_streams(tok):
    rng = random.Random(3)
    for ids in _cases(tok, rng):
        for stops, offset in (((), 0), (("\n\n",), 7), (("e",), 0)):
            choice, sent = _scored_stream(tok, ids, rng, stops, offset)
            entries = choice.scored()
            assert sent == entries and [e.record for e in entries] == list(range(len(entries)))
            assert "".join(e.text for e in entries) == choice.text
            assert all(e.start == offset + len("".join(x.text for x in entries[:k]))
                       for k, e in enumerate(entries))
    ids = tok.encode("the first line. the second line.", eos=False)
    choice, sent = _scored_stream(tok, ids, rng, stops=("second",))
    entries = choice.scored()
    assert choice.cut and sent == entries and 0 < len(entries) < len(ids)
    assert "".join(e.text for e in entries) == choice.text == tok.decode(ids).split("second")[0]
    # a stop string that begins where a character's first bytes already arrived: the
    # stream must not have sent those bytes' ids, which the stop string cuts off
    euro = [tok._sp.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    for step in range(1, 4):
        choice, sent = _scored_stream(tok, tok.encode("the line", eos=False) + euro,
                                      random.Random(step), stops=("€",))
        assert choice.cut and sent == choice.scored() and choice.text == "the line"


def test_a_choice_continues_its_prompts_text(tok):
    """The first new piece keeps its leading space after a prompt (SentencePiece drops it at
    the start of a text), so echo + text is the decoded whole."""
    prompt, new = tok.encode("the first", eos=False), tok.encode("the first line", eos=False)
    new = new[len(prompt):]
    choice = Choice(tok, (), eos_id=-1, prompt=prompt)
    choice.add(new, True)
    assert choice.ids == new
    assert tok.decode(prompt) + choice.text == tok.decode(prompt + new) == "the first line"
    assert choice.text.startswith(" ") and not tok.decode(new).startswith(" ")


def test_logprobs_json_has_openais_fields(tok):
    from pldr.inference.engine import TokenLogprobs

    ids = tok.encode("a word", eos=False)
    records = [None] + [TokenLogprobs(-1.5, ((ids[k], -1.5), (7, -2.0)))
                        for k in range(1, len(ids))]
    body = logprobs_json(tok, prompt_scored(tok, ids, records))
    assert set(body) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(body["tokens"]) == "a word" and body["token_logprobs"][0] is None
    assert body["top_logprobs"][0] is None and body["text_offset"][0] == 0
    piece = tok.id_to_piece(7).replace("\u2581", " ")
    assert all(top[piece] == -2.0 and len(top) == 2 for top in body["top_logprobs"][1:])
    # the chosen token is keyed by its text; an id past the tokenizer's pieces has no piece
    assert all(top[t] == -1.5 for t, top in zip(body["tokens"][1:], body["top_logprobs"][1:]))
    beyond = TokenLogprobs(-1.0, ((len(tok) + 5, -0.5),))
    top = logprobs_json(tok, [Scored(ids[0], "a", 0, beyond)])["top_logprobs"]
    assert top == [{"": -0.5, "a": -1.0}]


def test_a_stop_string_cuts_the_incremental_text(tok):
    ids = tok.encode("the first line. the second line.")
    choice, shown = _stream(tok, ids, random.Random(1), stops=("second",))
    assert choice.stopped and choice.text == tok.decode(ids).split("second")[0] == shown
