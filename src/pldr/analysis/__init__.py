"""Looking inside a model: its deductive outputs across inputs and through the caches.

- `collect.py`: deductive outputs per input, uncached and through the generation caches
  (`cached_deductive`, the paper's check that caching changes nothing);
- `report.py`: the numbers (G_LM invariance between inputs, det, log|det|, singular values);
- `plots.py`: matplotlib heatmaps and spread pictures (the `analysis` extra);
- `html.py`: index.html with every picture and its numbers;
- `inspection.py`: `inspect_model`, all of the above into one folder (`pldr inspect`);
- `extract.py`: the mean G_LM (and A_LM) over chunks of a data source (`pldr extract-G`).

Imports model, inference, data, checkpoint and the leaves (docs/development.md).
"""

from .collect import InputDeductive, cached_deductive, collect, uncached_deductive
from .extract import ExtractedG, RunningMoments, chunk_batches, data_chunks, extract_G_LM, spread_report
from .inspection import inspect_model
from .report import Invariance, Spectra, build_report, invariance, spectra

__all__ = ["InputDeductive", "cached_deductive", "uncached_deductive", "collect",
           "ExtractedG", "RunningMoments", "data_chunks", "chunk_batches", "extract_G_LM",
           "spread_report", "inspect_model", "Invariance", "Spectra", "build_report",
           "invariance", "spectra"]
