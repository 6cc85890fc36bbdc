"""Library errors name Python parameters (pldr.errors); each boundary spells them its own
way: the command line as its flags, the server as its request fields. Missing-extra messages
give the one install command that works for pldr as it is installed (an editable install from
the clone, pinned by constraints.txt), from one place."""

from __future__ import annotations

import pickle
import re
import sys
import tomllib
from pathlib import Path

import pytest

from pldr.cli import main
from pldr.cli import main as cli_main
from pldr.cli.main import RENAMED, _console_logging, build_parser, command_flags
from pldr.errors import CheckpointError, PLDRError, import_extra, install_extra_command, render

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
    finetune, extract = command_flags(parser, "finetune"), command_flags(parser, "extract-G")
    assert finetune["lora_targets"] == "--lora-targets" and finetune["merge"] == "--merge"
    assert extract["samples"] == "--samples" and extract["context_length"] == "--context-length"
    # where the Python name differs from the flag's dest (RENAMED)
    assert command_flags(parser, "eval")["model_path"] == "--model"  # pldr.finetune.score
    assert command_flags(parser, "inspect")["fmt"] == "--format"     # inspect_model(fmt=...)
    for command, renamed in RENAMED.items():
        assert set(renamed) <= set(command_flags(parser, command)), command


def test_library_log_lines_show_flags_on_the_command_line(capsys, caplog):
    """A warning the library logs names Python parameters; while a command runs, the CLI
    prints it with that command's flags."""
    from pldr.training.config import TrainConfig
    from pldr.training.prepare import fit_warmup

    with caplog.at_level("WARNING", logger="pldr"):
        fit_warmup(TrainConfig(warmup_steps=100), 8)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "`warmup_steps` 100" in said[0] and "reach `lr`" in said[0]
    capsys.readouterr()
    with _console_logging(command_flags(build_parser(), "train")):
        fit_warmup(TrainConfig(warmup_steps=100), 8)
    printed = capsys.readouterr().out
    assert printed.startswith("note: --warmup-steps 100 is not shorter than the run's 8 steps")
    assert "never reach --lr; warming up over 1 steps" in printed and "`" not in printed


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


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "pldr"


def _extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def test_the_install_command_names_the_clone_install_and_a_real_extra():
    assert (ROOT / "constraints.txt").is_file()  # what -c reads, beside pyproject.toml
    for extra in _extras():
        assert install_extra_command(extra) == f"pip install -c constraints.txt -e '.[{extra}]'"


def test_a_missing_extra_names_that_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(PLDRError) as e:
        import_extra("matplotlib", "analysis", "pictures")
    assert install_extra_command("analysis") in str(e.value)
    assert "matplotlib" in str(e.value) and "pldr-llm[" not in str(e.value)


def test_serve_without_its_extra_names_the_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    rc = cli_main(["serve", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and install_extra_command("serve") in err and len(err.splitlines()) == 1


def test_every_install_hint_in_the_code_comes_from_one_place():
    """No message names the package-index name pldr-llm (it is not published), and the only
    literal `pip install` of the package is the one in errors.py."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "pldr-llm[" in text:
            offenders.append(f"{path.relative_to(ROOT)}: pldr-llm[")
        if path.name != "errors.py" and re.search(r"pip install[^\n]*\.\[", text):
            offenders.append(f"{path.relative_to(ROOT)}: its own pip install")
    assert not offenders, offenders
