"""Every example of README.md and docs/*.md as its own test (see docs_collector.py).

A test id names the page and the example's line: `test_example[generation.md:12]`. The blocks
of a page share one namespace and one temporary working directory; selecting a single example
(`-k 'generation.md:40'`) runs the page's earlier python blocks first, so it sees what they
define.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from docs_collector import ROOT, PythonBlock, load, pages

DOCUMENTS = {page: load(page) for page in pages()}
EXAMPLES = [(page, i) for page, doc in DOCUMENTS.items() for i, _ in enumerate(doc.examples())]


class PageRun:
    """The state of one page's run: its working directory and the examples already run."""

    def __init__(self, page: Path):
        self.page = page
        self.workdir = Path(tempfile.mkdtemp(prefix=f"pldr-docs-{page.stem}-"))
        self.done: set[int] = set()
        self.examples = list(DOCUMENTS[page].examples())

    def run(self, index: int) -> None:
        """Run example `index`, after any python block before it that has not run yet."""
        for i in range(index):
            if i not in self.done and isinstance(self.examples[i].parsed, PythonBlock) \
                    and self.examples[i].parsed.skip_reason is None:
                self._evaluate(i)
        self._evaluate(index)

    def _evaluate(self, i: int) -> None:
        self.done.add(i)
        self.examples[i].evaluate()

    def close(self) -> None:
        """Stop any process the page started and left running (a server, when an example
        failed before its last block), remove the working directory and forget the page's
        names (models, tensors)."""
        for value in DOCUMENTS[self.page].namespace.values():
            if isinstance(value, subprocess.Popen) and value.poll() is None:
                value.kill()
                value.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        DOCUMENTS[self.page].namespace.clear()


@pytest.fixture(scope="module")
def runs():
    """One PageRun per page, removed at the end of the module. The examples run on tiny
    models, where a second torch thread only adds synchronisation (and stalls on a busy
    machine), so they run on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    state: dict[Path, PageRun] = {}
    yield state
    for run in state.values():
        run.close()
    torch.set_num_threads(threads)


def _id(item: tuple[Path, int]) -> str:
    page, i = item
    example = list(DOCUMENTS[page].examples())[i]
    return f"{page.name}:{example.line}"


@pytest.mark.parametrize("item", EXAMPLES, ids=[_id(e) for e in EXAMPLES])
def test_example(item, runs, monkeypatch):
    page, index = item
    run = runs.get(page)
    if run is None:
        for other in list(runs):  # pages run one after another: free the previous one
            runs.pop(other).close()
        run = runs.setdefault(page, PageRun(page))
    monkeypatch.chdir(run.workdir)
    monkeypatch.setenv("PLDR_CACHE_DIR", str(run.workdir / ".pldr-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run.run(index)


def test_every_page_has_been_collected():
    """README.md and the docs pages are all read, and the docs do hold examples (a broken
    fence pattern would otherwise pass with nothing to run)."""
    assert ROOT / "README.md" in DOCUMENTS and len(DOCUMENTS) > 5
    kinds = {type(e.parsed).__name__ for d in DOCUMENTS.values() for e in d.examples()}
    assert {"PythonBlock", "CommandLine"} <= kinds
    assert os.path.isdir(ROOT / "docs")
