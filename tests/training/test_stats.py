"""StepStats: a step's sums, packed into one float64 tensor for the all-reduce and back."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from pldr.training.distributed import DistInfo
from pldr.training.stats import StepStats


def test_pack_and_unpack_round_trip_every_field_in_order():
    values = [3.5, 7.0, 2.0, 0.25, 32.0, 0.5, 1.0, 0.0]
    stats = StepStats(*values)
    packed = stats.pack(torch.device("cpu"))
    assert packed.dtype == torch.float64 and packed.tolist() == values
    assert [f.name for f in dataclasses.fields(StepStats)][:3] == ["ce_sum", "tokens", "hits"]
    assert StepStats.unpack(packed) == stats


def test_batches_add_up_and_figures_weight_by_tokens():
    pad = 0
    stats = StepStats()
    y = torch.tensor([[5, 6, 0], [7, 0, 0]])               # 3 non-pad targets
    logits = torch.full((2, 3, 8), -1.0)
    logits[0, 0, 5] = logits[0, 1, 1] = logits[1, 0, 7] = 1.0  # 2 of 3 right
    lo = SimpleNamespace(ce=torch.tensor(2.0), dag={"A": torch.tensor(0.1),
                                                    "A_P": torch.tensor(4.0),
                                                    "G": torch.tensor(0.3)})
    stats.add_batch(lo, logits.argmax(-1), y, 3, pad)
    lo2 = SimpleNamespace(ce=torch.tensor(1.0), dag={})    # no DAG values this batch
    stats.add_batch(lo2, logits[:1, :1].argmax(-1), y[:1, :1], 1, pad)
    total = stats.all_reduce(DistInfo())                   # one process: the sums as floats
    assert isinstance(total.ce_sum, float) and total.tokens == 4 and total.hits == 3
    fig = total.figures((0.0, 0.0, 2.0))
    assert fig["ce"] == pytest.approx((2.0 * 3 + 1.0) / 4) and fig["accuracy"] == 0.75
    assert fig["dag_G"] == pytest.approx(0.3) and fig["dag_Ap"] == pytest.approx(4.0)
    assert fig["loss"] == pytest.approx(fig["ce"] + 2.0 * 0.3)
    assert StepStats().figures((0, 0, 0))["dag_A"] is None
