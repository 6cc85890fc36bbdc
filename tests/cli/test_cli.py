import subprocess
import sys

import pytest

from pldr.cli import build_parser, main


def test_python_dash_m_pldr_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "pldr", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("generate", "convert", "info", "tokenizer", "bench"):
        assert command in proc.stdout


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices  # the registered subcommands
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: pldr " + name in capsys.readouterr().out


def test_unknown_command_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "fly" in err[0]


def test_library_errors_become_exit_2_and_debug_shows_the_traceback(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    assert main(["info", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["--debug", "info", missing]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_one_version_in_pyproject_source_command_and_flag(capsys):
    """pyproject reads the version from pldr/_version.py (the installed metadata of an
    editable install can be stale, so the source is what is compared), and `pldr version`,
    `pldr --version` and `pldr.__version__` all print that one value."""
    import tomllib
    from pathlib import Path

    import pldr

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "pldr._version.__version__"
    source = (root / "src" / "pldr" / "_version.py").read_text()
    written = [line.split("=", 1)[1].strip().strip('"') for line in source.splitlines()
               if line.startswith("__version__")]
    assert written == [pldr.__version__]
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == pldr.__version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"pldr {pldr.__version__}"
    changelog = (root / "CHANGELOG.md").read_text()
    assert f"## {pldr.__version__}" in changelog  # the version has its changelog entry


def test_streamed_text_waits_for_the_last_byte_of_a_character(capsys):
    from pldr.cli.generate import _print_new_text

    shown = _print_new_text("ab", "")
    shown = _print_new_text("ab\ufffd", shown)        # first byte of a character: wait
    shown = _print_new_text("abé", shown)             # complete now
    _print_new_text("abéz\ufffd", shown, final=True)  # at the end, print what there is
    assert capsys.readouterr().out == "abéz\ufffd"


# ----- the error boundary ---------------------------------------------------------------------


def test_a_bug_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch, tmp_path):
    """Only PLDRError and file errors are bad input; any other exception (here a bare
    ValueError and a RuntimeError injected into `pldr info`) is a bug: traceback, exit 1."""
    import pldr.checkpoint.load as load

    for exc in (RuntimeError("boom inside"), ValueError("a bare value error")):
        def broken(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(load, "inspect_checkpoint", broken)
        assert main(["info", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and str(exc) in err
        assert err.strip().splitlines()[-1].startswith("error: this is a bug in pldr")


def test_a_file_error_is_one_line_naming_the_path(capsys, monkeypatch, tmp_path):
    import pldr.checkpoint.load as load

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "secret.json"))

    monkeypatch.setattr(load, "inspect_checkpoint", unreadable)
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "secret.json" in err[0]


def test_debug_is_accepted_anywhere_on_the_line(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    assert main(["info", missing, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# ----- pldr demo --out --------------------------------------------------------------------------


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_refuses_a_folder_it_did_not_make_and_deletes_nothing(capsys, tmp_path):
    """A real run's folder (it holds train_config.json) and a folder of other files: both
    are refused with one line, before any work, and every file survives byte for byte."""
    run = tmp_path / "my-run"
    (run / "checkpoints" / "step-00000100").mkdir(parents=True)
    (run / "train_config.json").write_text('{"max_steps": 100}')
    (run / "checkpoints" / "step-00000100" / "trainer_state.json").write_text("{}")
    (run / "notes.txt").write_bytes(b"\x00\x01 keep me")
    before = _snapshot(run)
    rc = main(["demo", "--out", str(run), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "did not make" in err[0] and "deletes nothing" in err[0]
    assert _snapshot(run) == before
    assert sorted(p.name for p in run.rglob("*")) == sorted(
        ["checkpoints", "step-00000100", "trainer_state.json", "train_config.json", "notes.txt"])


def test_demo_rerun_removes_only_what_the_demo_wrote(tmp_path):
    from pldr.cli.demo_job import DEMO_MARK, clear_previous_demo

    out = tmp_path / "demo"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "final").mkdir()
    for name in ("train_config.json", "metrics.jsonl", "tokenizer.model", DEMO_MARK,
                 "final/model.safetensors"):
        (out / name).write_text("x")
    (out / "mine.txt").write_text("the user's")  # added later by the user: kept
    clear_previous_demo(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([DEMO_MARK, "mine.txt"])
    assert (out / "mine.txt").read_text() == "the user's"
    clear_previous_demo(tmp_path / "new")  # a missing folder: nothing to do
    (tmp_path / "empty").mkdir()
    clear_previous_demo(tmp_path / "empty")  # an empty one is used as it is
