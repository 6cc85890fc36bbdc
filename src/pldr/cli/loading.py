"""Loading a model for inference from the flags `generate` and `serve` share."""

from __future__ import annotations

import argparse
from typing import Any


def load_for_inference(args: argparse.Namespace, max_batch: int = 16) -> tuple[Any, Any, Any]:
    """(model, engine, G_LM) from --model/--config/--G-LM/--device/--dtype/--compile.

    A --G-LM file is read once: a v510G checkpoint without its own G_LM takes it at load time,
    and every request uses it (a given G_LM wins over the model's own)."""
    from ..checkpoint.glm import load_G_LM
    from ..checkpoint.load import load_model
    from ..devices import resolve_device
    from ..inference import Engine

    G_LM = load_G_LM(args.G_LM) if args.G_LM else None
    model = load_model(args.model, args.config, device=resolve_device(args.device),
                       dtype=args.dtype)
    engine = Engine(model, max_batch=max_batch, compile=getattr(args, "compile", False))
    return model, engine, G_LM
