"""The documentation's shape: a short README, no working notes, a site whose navigation
names every page, and a collector that holds the examples to the convention."""

from __future__ import annotations

import re

import pytest
from sybil import Document

from docs_collector import ROOT, BadMarker, CommandLine, PythonBlock, parse_examples, pages

# Phrases of working notes that crept into the docs before; none may come back.
WORKING_NOTES = ("this stop", "previous stop", "next stop", "the issue's goals",
                 "second wave, stop", "to be confirmed by the integrator", "the integrator")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_no_working_notes(page):
    text = page.read_text().lower()
    found = [phrase for phrase in WORKING_NOTES if phrase in text]
    assert not found, f"{page.name} reads like working notes: {found}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_no_files_outside_the_repository(page):
    text = page.read_text()
    for name in ("SPEC.md", "DESIGN.md", "INTERFACE.md", "../shared", "shared/reference"):
        assert name not in text, f"{page.name} names {name}, which is not in the repository"


def test_navigation_lists_every_page():
    nav = re.findall(r"^\s*-\s+[^:\n]+:\s*([\w/.-]+\.md)\s*$",
                     (ROOT / "mkdocs.yml").read_text(), re.M)
    on_disk = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == on_disk


def _parsed(text: str) -> list:
    document = Document(text, "page.md")
    return [region.parsed for region in parse_examples(document)]


def test_collector_finds_blocks_commands_and_markers():
    text = ("```python\nx = 1\n```\n\n<!-- not-run: needs the hub -->\n```python\ny\n```\n"
            "```bash\npldr generate --model M \\\n    --prompt 'a b'   # comment\nls\n```\n")
    found = _parsed(text)
    assert found == [PythonBlock("x = 1\n", None), PythonBlock("y\n", "needs the hub"),
                     CommandLine("pldr generate --model M --prompt 'a b'   # comment")]


@pytest.mark.parametrize("marker", ["<!-- not-run -->", "<!-- not-run: -->",
                                    "<!-- not-run:    -->"])
def test_collector_refuses_a_marker_without_a_reason(marker):
    found = _parsed(f"{marker}\n```python\nimport nothing_here\n```\n")
    assert found == [BadMarker("a not-run marker needs a reason: <!-- not-run: REASON -->")]


def test_collector_refuses_a_marker_that_skips_no_python_block():
    found = _parsed("<!-- not-run: needs a GPU -->\n```bash\npldr version\n```\n")
    assert isinstance(found[0], BadMarker) and found[1] == CommandLine("pldr version")


def test_command_lines_go_through_the_real_parser():
    document = Document("```bash\npldr generate --model M --prompt hi --max-new-tokens 5\n"
                        "torchrun --nproc_per_node=2 -m pldr train --model tiny --data D\n"
                        "pldr generate --model M --no-such-flag\npldr nonsense\n"
                        "torchrun --nproc_per_node=2 -m pldr train --no-such-flag\n```\n",
                        "page.md")
    for region in parse_examples(document):
        document.add(region)
    good, good_torchrun, unknown_flag, unknown_command, bad_torchrun = document.examples()
    good.evaluate()
    good_torchrun.evaluate()
    for bad in (unknown_flag, unknown_command, bad_torchrun):
        with pytest.raises(AssertionError, match="does not parse"):
            bad.evaluate()


def test_code_names_no_file_outside_the_repository():
    """Docstrings, help texts and messages point at the docs pages, not at project notes
    that are not in the repository."""
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(name in line for name in ("SPEC.md", "DESIGN.md", "INTERFACE.md",
                                              "shared/", "reference/README")):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    assert not found, found
