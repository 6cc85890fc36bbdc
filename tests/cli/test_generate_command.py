"""`pldr generate` prints the prompt and its continuation as one text (the continuation in
bold on a terminal, plain when piped); --json keeps the continuation's leading space; --help
shows every default."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys

import pytest
import torch
from pydoc_data.topics import topics

from pldr import PLDRConfig, PLDRModel
from pldr.cli import build_parser, main
from pldr.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """A model whose output bias makes one word piece win every step ("▁the"-like: a piece
    that starts a word, so its text starts with a space), with its tokenizer."""
    root = tmp_path_factory.mktemp("generate")
    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:40]], 400, str(root / "tok"))
    word = tok.encode("the", eos=False)  # SentencePiece's dummy prefix: the piece "▁the"
    assert len(word) == 1 and tok._sp.id_to_piece(word[0]).startswith("\u2581")
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.preset("tiny").replace(vocab_size=tok.vocab_size, num_layers=1))
    with torch.no_grad():
        model.final_layer.weight.zero_()
        model.final_layer.bias.fill_(-50.0)
        model.final_layer.bias[word[0]] = 50.0
    model.save_pretrained(root / "model", tokenizer=tok)
    return root / "model", tok


def _argv(model_dir, *extra):
    return ["generate", "--model", str(model_dir), "--max-new-tokens", "3", "--temperature", "0",
            "--eos-id", "-1", *extra]


def test_piped_output_is_the_prompt_and_its_continuation_as_one_text(forced, capsys):
    model_dir, _ = forced
    assert main(_argv(model_dir, "--prompt", "The import")) == 0
    assert capsys.readouterr().out == "The import the the the\n"  # no escape codes when piped


def test_json_keeps_the_continuations_leading_space(forced, capsys):
    model_dir, tok = forced
    assert main(_argv(model_dir, "--prompt", "The import", "--prompt", "A", "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == [" the the the"] * 2
    assert rows[0]["prompt_ids"] == tok.encode("The import", eos=False)


def test_a_terminal_gets_the_continuation_in_bold(forced, monkeypatch):
    model_dir, _ = forced

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for argv, want in ((_argv(model_dir, "--prompt", "The import"),
                        "The import\033[1m the the the\033[0m\n"),
                       (_argv(model_dir, "--prompt", "The import", "--prompt", "A"),
                        "[0] The import\033[1m the the the\033[0m\n[1] A\033[1m the the the\033[0m\n")):
        out = Terminal()
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert main(argv) == 0
        assert out.getvalue() == want
        out = Terminal()
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setenv("NO_COLOR", "1")
        assert main(argv) == 0
        assert "\033[" not in out.getvalue()


def test_help_shows_every_default(capsys):
    """Each option with a value by default shows it; those whose default is a rule (the
    config's EOS, a random seed, cuda if available, ...) say it in words."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n  (?=-)", options)[1:]}
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    in_words = {"--seed", "--eos-id", "--device", "--tokenizer", "--compile", "--json"}
    for action in sub._actions:
        flag = action.option_strings[-1] if action.option_strings else None
        if flag in in_words:
            assert "(default: " in blocks[flag], blocks[flag]
        elif flag and action.default not in (None, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in blocks[flag], blocks[flag]
    assert "(default: 64)" in blocks["--max-new-tokens"]
    assert "(default: kv_g)" in blocks["--cache"] and "(default: 1.0)" in blocks["--temperature"]
