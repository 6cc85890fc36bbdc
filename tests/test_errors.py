"""Library errors name Python parameters (pldr.errors); each boundary spells them its own
way: the command line as its flags, the server as its request fields."""

from __future__ import annotations

import pickle

import pytest

from pldr.cli import main
from pldr.cli.main import build_parser, command_flags
from pldr.errors import CheckpointError, PLDRError, render


def test_an_error_knows_its_parameter_and_survives_pickling():
    e = CheckpointError("`resume='auto'`: nothing to resume; start without `resume`")
    assert e.param == "resume"  # the first parameter the message names
    assert PLDRError("no parameter here").param is None
    given = PLDRError("max_new_tokens must be >= 0", param="max_new_tokens")
    back = pickle.loads(pickle.dumps(given))  # it crosses the engine process's pipe
    assert type(back) is PLDRError and back.param == "max_new_tokens"
    assert str(back) == str(given)


def test_render_spells_parameters_as_flags_or_fields():
    message = ("`out='runs/a'` holds a run; pass `resume='auto'`, or `truncate_later_steps=True`,"
               " a lower `lr`, or `fork_to='my dir'`; check any `G_LM` file")
    flags = {"out": "--out", "resume": "--resume", "truncate_later_steps": "--truncate-later-steps",
             "lr": "--lr", "fork_to": "--fork-to"}
    assert render(message, flags) == (
        "--out runs/a holds a run; pass --resume auto, or --truncate-later-steps, a lower --lr, "
        "or --fork-to 'my dir'; check any G_LM file")
    assert render(message, {}) == (  # a Python reader: the names, without the backticks
        "out='runs/a' holds a run; pass resume='auto', or truncate_later_steps=True, a lower lr, "
        "or fork_to='my dir'; check any G_LM file")
    assert render("`max_new_tokens` must be >= 0", {"max_new_tokens": "max_tokens"}, "=") \
        == "max_tokens must be >= 0"
    assert render("see `pldr train --data DIR`", flags) == "see `pldr train --data DIR`"


def test_each_command_spells_parameters_as_its_own_flags():
    parser = build_parser()
    serve, convert, train = (command_flags(parser, c) for c in ("serve", "convert", "train"))
    assert serve["max_len"] == "--max-len" and serve["G_LM"] == "--G-LM"
    assert convert["dest"] == "--out"  # convert_model(dest=...) is `pldr convert --out`
    assert train["resume"] == "--resume" and train["lr_alpha"] == "--lr-alpha"
    assert command_flags(parser, "data")["workers"] == "--workers"  # a nested subcommand


def test_the_cli_names_the_flag_and_python_the_parameter(tmp_path, capsys):
    from pldr.training.checkpointing import find_resume_checkpoint

    with pytest.raises(CheckpointError) as err:
        find_resume_checkpoint("auto", tmp_path)
    assert "--" not in str(err.value) and "`resume='auto'`" in str(err.value)
    assert err.value.param == "resume"
    code = main(["train", "--resume", "auto", "--out", str(tmp_path), "--data", "x"])
    line = capsys.readouterr().err.strip()
    assert code == 2 and line.startswith("error: --resume auto: ") and "`" not in line
    assert "start without --resume, or pass the right --out" in line
