"""Predefined G_LM files: the paper's pickles (read through the restricted unpickler),
`.pt` files and our `.safetensors` layout.

G_LM `.safetensors` layout (written by `save_G_LM`, read by `load_G_LM`): a tensor `G_LM`
[L, H, dk, dk] (one [H, dk, dk] slice per decoder layer), optionally `A_LM` of the same shape,
and the header metadata {"format": "pt", "content": "pldr.G_LM"}. A leading singleton axis,
[L, 1, H, dk, dk], is accepted on reading.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, PLDRError
from ..files import atomic_write_bytes, save_safetensors
from ..model.cache import stack_per_layer
from ..model.pretrained import read_safetensors
from .original import (
    ZIP_MAGIC,
    first_few,
    restricted_unpickle,
    starts_with,
    torch_load,
)


def load_G_LM(path: str | os.PathLike, device: str | torch.device = "cpu") -> list[Tensor]:
    """The per-layer G_LM of a predefined G_LM file: a list of L float tensors [1, H, dk, dk].

    Reads the paper's pickles (lists of G_LM, or of [A_LM, G_LM] pairs) without running any
    code from them, `.pt`/`.pth` files (a tensor [L, (1,) H, dk, dk], a list, or a dict with
    `G_LM`) and our `.safetensors` layout (module docstring)."""
    return load_G_LM_pairs(path, device)[1]


def load_G_LM_pairs(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[list[Tensor] | None, list[Tensor]]:
    """(A_LM, G_LM) of a G_LM file, each a list of L tensors [1, H, dk, dk]; A_LM is None when
    the file holds G_LM only. Pairs files are the original's initial G-cache format."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"G_LM file {str(path)!r} is a directory; give the G_LM file "
                              "itself (.pkl, .pt or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"G_LM file {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors(path)
    elif starts_with(path, ZIP_MAGIC):
        obj = torch_load(path, device)
    else:
        obj = restricted_unpickle(path, device)
        if isinstance(obj, int):  # legacy (non-zip) torch.save: a magic number comes first
            obj = torch_load(path, device)
    A_LM, G_LM = _pairs_of(obj, path)
    for name, tensors in (("A_LM", A_LM), ("G_LM", G_LM)):
        for i, t in enumerate(tensors or ()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"{str(path)!r}: {name} of layer {i} holds NaN or "
                                      "infinite values; a G_LM must be finite")
    move = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
    return move(A_LM), move(G_LM)


def save_G_LM(G_LM: Tensor | Sequence[Tensor], path: str | os.PathLike,
              A_LM: Tensor | Sequence[Tensor] | None = None) -> None:
    """Write per-layer G_LM (and optionally A_LM) as a `.safetensors` file that `load_G_LM`
    reads: tensors `G_LM` (and `A_LM`) [L, H, dk, dk], metadata content "pldr.G_LM"."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save_G_LM writes safetensors; name the file *.safetensors, "
                              f"not {path.name!r}")
    tensors = {"G_LM": _stack_layers(G_LM, "G_LM")}
    if A_LM is not None:
        tensors["A_LM"] = _stack_layers(A_LM, "A_LM")
        if tensors["A_LM"].shape != tensors["G_LM"].shape:
            raise CheckpointError(f"A_LM has shape {list(tensors['A_LM'].shape)} but G_LM "
                                  f"{list(tensors['G_LM'].shape)}; they must match")
    save_safetensors(tensors, path, metadata={"format": "pt", "content": "pldr.G_LM"})


def save_G_LM_original(G_LM: Tensor | Sequence[Tensor], path: str | os.PathLike) -> None:
    """Write per-layer G_LM in the release's `predefined_G_LM_cache_list_*` format: a plain
    pickle (protocol 5) of a list of L float32 CPU tensors [1, H, dk, dk], each with its own
    storage. The original code reads it with `pickle.load`, `load_G_LM` with the restricted
    unpickler (only tensor-rebuilding globals are in such a pickle)."""
    layers = [t[None].to(torch.float32).clone() for t in _stack_layers(G_LM, "G_LM")]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        data = pickle.dumps(layers, protocol=5)
    atomic_write_bytes(path, data)


def _stack_layers(tensors: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """Per-layer tensors as one contiguous CPU float tensor [L, H, dk, dk]."""
    layers = _per_layer(tensors, name, Path(name))
    return torch.stack([t[0] for t in layers]).detach().to("cpu").contiguous()


def _pairs_of(obj: Any, path: Path) -> tuple[list[Tensor] | None, list[Tensor]]:
    """(A_LM or None, G_LM) from whatever structure the file held."""
    if isinstance(obj, Mapping):
        if "G_LM" not in obj:
            raise CheckpointError(f"{str(path)!r} has no 'G_LM' entry (found "
                                  f"{first_few([str(k) for k in obj])}); see save_G_LM")
        A = obj.get("A_LM")
        G = _per_layer(obj["G_LM"], "G_LM", path)
        return (None if A is None else _per_layer(A, "A_LM", path)), G
    if isinstance(obj, (list, tuple)) and obj and all(
            isinstance(e, (list, tuple)) and len(e) == 2 for e in obj):
        return (_per_layer([e[0] for e in obj], "A_LM", path),
                _per_layer([e[1] for e in obj], "G_LM", path))
    return None, _per_layer(obj, "G_LM", path)


def _per_layer(obj: Any, name: str, path: Path) -> list[Tensor]:
    """A list of L float tensors [1, H, dk, dk] from a stacked tensor or a per-layer list."""
    try:
        return list(stack_per_layer(obj, None, name).unbind(0))
    except PLDRError as e:
        raise CheckpointError(f"{str(path)!r}: {e}") from None
