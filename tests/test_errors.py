"""Missing-extra messages give the one install command that works for pldr as it is
installed (an editable install from the clone, pinned by constraints.txt), from one place."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

from pldr.cli import main as cli_main
from pldr.errors import PLDRError, import_extra, install_extra_command

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
