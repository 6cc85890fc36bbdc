"""The examples of the documentation, found with sybil and run as tests.

The convention (docs/development.md, "Documentation"):
- every ```python block of README.md and docs/*.md runs; the blocks of one page run in order,
  in one namespace, in a fresh temporary working directory of that page;
- a block right after a line `<!-- not-run: REASON -->` is skipped with that reason (only for
  examples that need the hub or a GPU); a marker without a reason, or one that is not followed
  by a python block, is an example that fails;
- every command line starting with `pldr ` in a ```bash block (backslash continuations joined,
  `# comments` dropped), and the pldr part of `torchrun ... -m pldr ...`, is parsed by the real
  parser, `pldr.cli.main.build_parser()`: an
  unknown flag or a missing argument fails; placeholder values (MODEL, $KEY) are fine.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from sybil import Document, Example, Region

ROOT = Path(__file__).resolve().parents[2]

# ```python / ```bash fences (at the start of a line) and their body, up to the closing fence
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TORCHRUN = re.compile(r"^torchrun\s.*\s-m\s+pldr\s")  # `torchrun ... -m pldr train ...`
MARKER = re.compile(r"^<!--\s*not-run\b(?P<rest>.*?)-->[ \t]*$", re.M)


def pages() -> list[Path]:
    """README.md and every docs/*.md, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class PythonBlock:
    """A ```python block: its code, and the reason it is not run (None: it runs)."""

    code: str
    skip_reason: str | None


@dataclass(frozen=True)
class CommandLine:
    """One `pldr ...` command line of a ```bash block, continuations joined."""

    text: str


@dataclass(frozen=True)
class BadMarker:
    """A not-run marker the convention refuses, with what is wrong."""

    problem: str


def marker_reason(rest: str) -> str | None:
    """The reason of a not-run marker's text after `not-run`, or None when it has none."""
    rest = rest.strip()
    if not rest.startswith(":"):
        return None
    return rest[1:].strip() or None


def parse_examples(document: Document) -> Iterator[Region]:
    """The sybil parser: a region per python block, per `pldr` command line and per bad
    marker, in document order."""
    text = document.text
    fences = list(FENCE.finditer(text))
    markers = list(MARKER.finditer(text))
    claimed: set[int] = set()  # markers that precede a python block
    regions: list[Region] = []
    for fence in fences:
        lang, body = fence.group("lang"), fence.group("body")
        if lang == "python":
            marker = _marker_before(text, fence.start(), markers)
            reason = None
            if marker is not None:
                claimed.add(marker.start())
                reason = marker_reason(marker.group("rest"))
                if reason is None:
                    regions.append(Region(marker.start(), marker.end(), BadMarker(
                        "a not-run marker needs a reason: <!-- not-run: REASON -->"),
                        _fail_marker))
                    continue
            regions.append(Region(fence.start(), fence.end(), PythonBlock(body, reason),
                                  _run_python))
        elif lang in ("bash", "sh", "shell", "console"):
            offset = fence.start("body")
            for start, end, line in _command_lines(body):
                if line.startswith("pldr ") or TORCHRUN.match(line):
                    regions.append(Region(offset + start, offset + end, CommandLine(line),
                                          _parse_command))
    for marker in markers:
        if marker.start() not in claimed:
            regions.append(Region(marker.start(), marker.end(), BadMarker(
                "a not-run marker must come right before a ```python block"), _fail_marker))
    yield from sorted(regions, key=lambda r: r.start)


def _marker_before(text: str, fence_start: int, markers: list[re.Match]) -> re.Match | None:
    """The marker whose line comes right before the fence (blank lines between allowed)."""
    for marker in markers:
        if marker.end() <= fence_start and not text[marker.end():fence_start].strip():
            return marker
    return None


def _command_lines(body: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, line) of each logical line of a shell block, continuations joined."""
    pos, start, parts = 0, None, []
    for raw in body.splitlines(keepends=True):
        line = raw.rstrip("\n")
        if start is None:
            start = pos
        pos += len(raw)
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, pos, " ".join(p.strip() for p in parts).strip()
        start, parts = None, []
    if parts:
        yield start, pos, " ".join(p.strip() for p in parts).strip()


def _run_python(example: Example) -> None:
    block: PythonBlock = example.parsed
    if block.skip_reason is not None:
        pytest.skip(f"not run: {block.skip_reason}")
    code = compile("\n" * example.line + block.code, str(example.path), "exec")
    exec(code, example.namespace)


def _parse_command(example: Example) -> None:
    from pldr.cli.main import build_parser

    words = shlex.split(example.parsed.text, comments=True)
    argv = words[words.index("pldr") + 1:]  # after `pldr`, or after torchrun's `-m pldr`
    argv = [a for a in argv if a != "--debug"]  # main() takes it out before parsing
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help and --version exit 0
            raise AssertionError(f"`{example.parsed.text}` does not parse (exit {e.code}); "
                                 "see the error line above") from None


def _fail_marker(example: Example) -> None:
    raise AssertionError(f"{example.path}:{example.line}: {example.parsed.problem}")


def load(page: Path) -> Document:
    """The page parsed into its examples."""
    return Document.parse(str(page), parse_examples)
