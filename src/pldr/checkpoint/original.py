"""The original release's files, read safely: `.pth` checkpoints through
`torch.load(weights_only=True)` with one-line errors, their state dicts (wrapper prefixes
stripped, the variant told by the keys), and the restricted unpickler for the paper's G_LM
pickles, which admits only the three functions that rebuild tensors (docs/checkpoints.md,
"Safe loading"). Its names are public: `load.py` and `glm.py` build on them.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import CheckpointError

_PREFIXES = ("module.", "_orig_mod.")          # DDP/FSDP wrappers and torch.compile
_LEARNER_MARKERS = ("plgatt_layer", "reslayerAs")  # only v510 has these keys
ZIP_MAGIC = b"PK\x03\x04"


def require_config(config: Any, path: Path) -> PLDRConfig:
    """An original checkpoint holds no hyperparameters: the caller must give them."""
    if config is None:
        raise CheckpointError(f"{str(path)!r} holds weights only; pass its config as `config` "
                              "(an hpdict dict, a PLDRConfig or a JSON path)")
    return PLDRConfig.resolve(config)


def config_for_state(config: PLDRConfig, state: Mapping[str, Tensor]) -> PLDRConfig:
    """The config with its variant set from the keys: no metric-learner keys means v510G."""
    learned = any(m in k for k in state for m in _LEARNER_MARKERS)
    variant = "v510" if learned else "v510G"
    return config if config.variant == variant else config.replace(variant=variant)


def torch_load(path: Path, device: str | torch.device) -> Any:
    """`torch.load(weights_only=True)` with one-line errors; refuses files that need code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        try:
            return torch.load(path, weights_only=True, map_location=device)
        except pickle.UnpicklingError as e:
            reason = _weights_only_reason(e)
            if "GLOBAL" in reason or starts_with(path, b"\x80"):  # a pickle torch refuses
                raise CheckpointError(f"refusing to load {str(path)!r}: it is not plain tensor "
                                      f"data ({reason}); only tensors and plain containers are "
                                      "allowed (a G_LM pickle goes to load_G_LM)") from None
            raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch checkpoint: "
                                  f"{reason}") from None
        except Exception as e:  # noqa: BLE001  torch raises many kinds on a corrupt file
            raise CheckpointError(f"cannot read {str(path)!r} as a PyTorch checkpoint: "
                                  f"{type(e).__name__}: {e}") from None


def _weights_only_reason(e: Exception) -> str:
    """The informative line of torch's long weights_only error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if any(w in ln for w in ("Unsupported", "GLOBAL", "unsupported", "blocked")):
            return ln.rstrip(".")
    return lines[-1].rstrip(".") if lines else type(e).__name__


def state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside what the original saves ({'model_state_dict': ...}) or a bare one."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{str(path)!r} holds no state dict (expected a dict with "
                              "'model_state_dict' or a dict of tensors)")
    bad = next((k for k, v in obj.items()
                if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{str(path)!r}: entry {bad!r} is not a named tensor; expected a "
                              "state dict")
    return dict(obj)


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop `module.` / `_orig_mod.` prefixes that wrappers add to every key."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def starts_with(path: Path, magic: bytes) -> bool:
    """Whether the file's first bytes are `magic`."""
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles tensor data only: the three globals that rebuild tensors are admitted (one of
    them replaced by a weights_only load); any other global is refused before it runs."""

    def __init__(self, file: io.BufferedIOBase, path: Path, device: str | torch.device):
        super().__init__(file)
        self.path, self.device = path, device

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.storage", "_load_from_bytes"): self._storage_from_bytes,
        }
        if (module, name) not in allowed:
            raise CheckpointError(f"refusing to load {str(self.path)!r}: the pickle wants to "
                                  f"call {module}.{name}; only tensor data is allowed")
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refusing to load {str(self.path)!r}: it uses persistent ids "
                              "(a torch.save file?); only plain pickled tensors are read here")

    def _storage_from_bytes(self, blob: bytes) -> Any:
        """A legacy torch.save blob of one storage, read with weights_only on self.device."""
        if not isinstance(blob, (bytes, bytearray)):
            raise CheckpointError(f"refusing to load {str(self.path)!r}: a storage blob is "
                                  f"{type(blob).__name__}, not bytes")
        return torch.load(io.BytesIO(blob), weights_only=True, map_location=self.device)

    def _rebuild_tensor(self, storage: Any, offset: int, size: Any, stride: Any,
                        requires_grad: bool = False, backward_hooks: Any = None,
                        metadata: Any = None) -> Tensor:
        """torch._utils._rebuild_tensor_v2 for real storages and no hooks only."""
        if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
            raise CheckpointError(f"refusing to load {str(self.path)!r}: a tensor is rebuilt "
                                  f"from {type(storage).__name__}, not a storage")
        if backward_hooks:
            raise CheckpointError(f"refusing to load {str(self.path)!r}: a tensor carries "
                                  "backward hooks")
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                                               OrderedDict(), metadata)


def restricted_unpickle(path: Path, device: str | torch.device) -> Any:
    """Unpickle `path` with `_TensorOnlyUnpickler`, all failures as CheckpointError."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        try:
            with open(path, "rb") as f:
                return _TensorOnlyUnpickler(f, path, device).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  corrupt pickles raise many kinds
            raise CheckpointError(f"cannot read {str(path)!r} as a G_LM file: "
                                  f"{type(e).__name__}: {e}") from None

def first_few(keys: Sequence[str], n: int = 3) -> str:
    """`a, b, c (and 5 more)`."""
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


__all__ = ["ZIP_MAGIC", "require_config", "config_for_state", "torch_load", "state_dict_of",
           "strip_prefixes", "starts_with", "restricted_unpickle", "first_few"]
