"""`pldr bench`: speed and peak memory, one fresh process per measurement (measure.py)."""

from .measure import (
    MEASUREMENTS,
    BenchResult,
    BenchSpec,
    format_table,
    machine_info,
    measure,
)

__all__ = ["MEASUREMENTS", "BenchSpec", "BenchResult", "machine_info", "measure", "format_table"]
