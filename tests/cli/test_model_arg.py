"""One rule for what --model names, in every command: an existing path wins, else a preset
where a fresh model makes sense (train, bench), else one line that lists both; a training
run's folder is answered with "did you mean RUN/final"."""

from __future__ import annotations

import pytest

from pldr import PLDRConfig, PLDRModel
from pldr.cli import main
from pldr.config import PRESETS

# command -> argv with M for the model (everything else valid enough to reach the model)
TRAINED = {
    "generate": ["generate", "--model", "M", "--prompt", "hi"],
    "serve": ["serve", "--model", "M"],
    "eval": ["eval", "--model", "M", "--tasks", "x"],
    "inspect": ["inspect", "--model", "M", "--text", "hi", "--out", "OUT"],
    "extract-G": ["extract-G", "--model", "M", "--data", "builtin", "--samples", "1",
                  "--out", "OUT/G.safetensors"],
    "convert": ["convert", "M", "--out", "OUT"],
    "info": ["info", "M"],
}
FRESH = {
    "bench": ["bench", "--model", "M", "--what", "decode"],
    "train": ["train", "--model", "M", "--out", "OUT", "--max-steps", "1"],
}


def _run(argv, model, out, capsys):
    """(exit status, stderr) of `pldr ARGV`."""
    rc = main([model if a == "M" else a.replace("OUT", str(out)) for a in argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(TRAINED))
def test_a_preset_where_trained_weights_are_needed_is_named_as_such(command, capsys, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(TRAINED[command], "pldr-110m", tmp_path / "out", capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    flag = "SRC" if command == "convert" else "CKPT" if command == "info" else "--model"
    assert f"{flag} 'pldr-110m' does not exist" in err and str(tmp_path / "pldr-110m") in err
    assert "'pldr-110m' is a preset" in err and "pldr train and pldr bench" in err
    rc, err = _run(TRAINED[command], "nothing-here", tmp_path / "out", capsys)
    assert rc == 2 and all(name in err for name in PRESETS) and "looked for" in err


@pytest.mark.parametrize("command", sorted(FRESH))
def test_a_name_that_is_neither_lists_the_presets_and_the_path(command, capsys, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(FRESH[command], "pldr-9000b", tmp_path / "out", capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "neither a preset" in err and all(name in err for name in PRESETS)
    assert str(tmp_path / "pldr-9000b") in err


@pytest.mark.parametrize("command", sorted({**TRAINED, **FRESH}))
def test_a_run_folder_is_answered_with_its_final_model(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    PLDRModel(PLDRConfig.preset("tiny").replace(num_layers=1)).save_pretrained(run / "final")
    rc, err = _run({**TRAINED, **FRESH}[command], "runs/demo", tmp_path / "out", capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "training run folder" in err and "did you mean 'runs/demo/final'?" in err
    assert not (tmp_path / "out").exists()


def test_an_existing_path_wins_over_a_preset_of_its_name(tmp_path, monkeypatch):
    """A folder called `tiny` beside you is what `--model tiny` means, in train as anywhere."""
    monkeypatch.chdir(tmp_path)
    mine = PLDRConfig.preset("tiny").replace(num_layers=1, d_model=32, num_heads=2)
    PLDRModel(mine).save_pretrained(tmp_path / "tiny")
    assert PLDRConfig.resolve("tiny", "--model") == mine
    assert PLDRConfig.resolve("pldr-110m", "--model") == PRESETS["pldr-110m"]


def test_a_command_line_parses_without_its_files():
    """The rule applies when the command runs, not while parsing (the docs' examples are
    parsed without their files)."""
    from pldr.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "runs/demo/final", "--prompt", "x"])
    assert args.model == "runs/demo/final"
