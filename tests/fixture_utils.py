"""Shared helpers for the parity tests on the original's fixture (tests/fixtures/original/).

The fixture is a small v510 model of the original release (2 layers, 4 heads of 16, d_model
64, vocabulary 300) with two 24-token inputs and what the original computed for them; see
tests/fixtures/README.md."""

from __future__ import annotations

import json
import socket
from functools import lru_cache
from pathlib import Path

import torch

from pldr import PLDRConfig, PLDRModel

FIXTURE = Path(__file__).parent / "fixtures" / "original"


def fixture_file(name: str) -> Path:
    path = FIXTURE / name
    assert path.is_file(), f"fixture file {path} is missing: restore tests/fixtures/original from git"
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


# Tolerances of tests/fixtures/README.md (the fixture's README), in one place: every parity test
# takes its bound from here. Each is relative to the expected tensor's largest magnitude when
# that exceeds 1 (absolute below). A_P = A_LM ** pw amplifies float32 rounding, so A_P and
# G_LM, and logits computed from a G_LM that the step recomputes from the whole sequence
# (no_cache decoding), carry ten times more: a float64 run of the fixture model differs from
# the fixture's no_cache step-8 logits by 4.6e-5 relative, so 1e-5 would only hold by luck.
FIXTURE_TOL = {"logits": 1e-5, "hidden": 1e-5, "A": 1e-5, "A_LM": 1e-5, "loss": 1e-5,
               "A_P": 1e-4, "G_LM": 1e-4, "recomputed_logits": 1e-4}
# The transformers port's fixture (tests/fixtures/hfport/README.md): between two float32
# implementations with different op orders, logits 5e-5, A and A_LM 1e-5, A_P and G_LM 2e-4;
# a float64 run against the port's float64 logits 1e-9.
HFPORT_TOL = {"logits": 5e-5, "A": 1e-5, "A_LM": 1e-5, "A_P": 2e-4, "G_LM": 2e-4,
              "logits_float64": 1e-9}
# DAG values, relative (the README: dag_A and dag_G 1e-5, dag_Ap 1e-3 as it sits near overflow)
DAG_REL_TOL = {"A": 1e-5, "G": 1e-5, "A_P": 1e-3}

# Properties that are exact in exact arithmetic (a padded row equals the row alone, cached
# equals uncached where the modes coincide, a batch equals one by one): float64 must hold them
# to 1e-10; float32 only to summation-order rounding, amplified by the power law.
PROPERTY_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def max_scaled_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, max(1, max |want|)), computed in float64."""
    scale = max(1.0, want.abs().max().item())
    return (got.double() - want.double()).abs().max().item(), scale


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: float, what: str = ""):
    """|got - want| <= tol * max(1, max|want|): absolute below 1, relative above."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = max_scaled_error(got, want)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def assert_matches_fixture(got: torch.Tensor, want: torch.Tensor, kind: str, what: str = "",
                           tolerances: dict = FIXTURE_TOL):
    """Compare with what the reference computed, at its fixture README's bound for `kind`
    (`tolerances=HFPORT_TOL` for the transformers port's fixture)."""
    assert_close_scaled(got, want, tolerances[kind], what=what or kind)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    """An exact property, checked at the bound for the tensors' dtype (float64: 1e-10)."""
    assert got.dtype == want.dtype, f"{what}: dtypes {got.dtype} and {want.dtype}"
    assert_close_scaled(got, want, PROPERTY_TOL[got.dtype], what=what)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or torchrun's
    rendezvous in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
