"""Shared pytest helpers: where the original release's reference data lives, and a fresh
torch.compile cache for each run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# torch 2.13's inductor reuses a cached CPU kernel built for another instruction set: after a
# run with AVX-512, the same compiled decode under ATEN_CPU_CAPABILITY=avx2 read garbage (NaN
# logits, out-of-bounds indices). Each test run (and its subprocesses) compiles afresh.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="pldr-test-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE
    atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

# The reference data sits next to the project: <repo>/../shared/reference.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_dir(*parts: str) -> Path:
    """Path of a file or folder under the reference data.

    When it is missing the test is skipped, or fails when PLDR_REQUIRE_REFERENCE=1 (CI runs
    with the reference data set this, so a lost file cannot pass unnoticed)."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        reason = (f"reference data {path} is missing (it lives outside the project, in "
                  "../shared/reference)")
        if os.environ.get("PLDR_REQUIRE_REFERENCE") == "1":
            pytest.fail(reason + "; PLDR_REQUIRE_REFERENCE=1 requires it")
        pytest.skip(reason)
    return path
