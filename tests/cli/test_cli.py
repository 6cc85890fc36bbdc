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


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip()


def test_streamed_text_waits_for_the_last_byte_of_a_character(capsys):
    from pldr.cli.generate import _print_new_text

    shown = _print_new_text("ab", "")
    shown = _print_new_text("ab\ufffd", shown)        # first byte of a character: wait
    shown = _print_new_text("abé", shown)             # complete now
    _print_new_text("abéz\ufffd", shown, final=True)  # at the end, print what there is
    assert capsys.readouterr().out == "abéz\ufffd"
