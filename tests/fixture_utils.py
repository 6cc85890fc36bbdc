"""Shared helpers for the parity tests on the original's fixture (tests/data/fixture/).

The fixture is a small v510 model of the original release (2 layers, 4 heads of 16, d_model
64, vocabulary 300) with two 24-token inputs and what the original computed for them; see
tests/data/README.md."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from pldr import PLDRConfig, PLDRModel

FIXTURE = Path(__file__).parent / "data" / "fixture"


def fixture_file(name: str) -> Path:
    path = FIXTURE / name
    assert path.is_file(), f"fixture file {path} is missing: restore tests/data/fixture from git"
    return path


def fixture_hpdict() -> dict:
    return json.loads(fixture_file("config.json").read_text())


def fixture_config(**overrides) -> PLDRConfig:
    return PLDRConfig.from_hpdict(fixture_hpdict(), **overrides)


@lru_cache(maxsize=None)
def _state_dict(name: str) -> dict:
    return torch.load(fixture_file(name), weights_only=True)["model_state_dict"]


def fixture_model(**overrides) -> PLDRModel:
    """The original's fixture model in eval mode (overrides go to the config)."""
    model = PLDRModel(fixture_config(**overrides))
    model.load_state_dict(_state_dict("checkpoint.pth"))
    return model.eval()


def fixture_v510G_model() -> PLDRModel:
    """The fixture's v510G identity twin (its checkpoint lacks the G_LM buffers: identity)."""
    model = PLDRModel(fixture_config(variant="v510G", metric_includes_pad=True))
    missing, unexpected = model.load_state_dict(_state_dict("v510G_identity_checkpoint.pth"),
                                                strict=False)
    assert not unexpected and all(k.endswith("mha1.G_LM") for k in missing)
    return model.eval()


@lru_cache(maxsize=None)
def inputs() -> dict:
    return torch.load(fixture_file("inputs.pt"), weights_only=True)


@lru_cache(maxsize=None)
def expected(name: str = "expected.pt") -> dict:
    return torch.load(fixture_file(name), weights_only=True)


def generation() -> dict:
    return json.loads(fixture_file("generation.json").read_text())


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, what: str = ""):
    """|got - want| <= tol * max(1, max|want|): 1e-5 absolute, relative for tensors above 1."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"
