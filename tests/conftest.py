"""Shared pytest helpers: where the original release's reference data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
