"""Reading and writing models and G_LM files, safely.

- `load_model`: an original checkpoint (`.pth`/`.pt`, as the original release saves it) with
  its hpdict, or a directory written by `save_pretrained` (`config.json` +
  `model.safetensors`). The model is built on the meta device and takes the loaded tensors
  as they are (no second copy, no random init).
- `save_pretrained`: our directory format, written under a temporary name and renamed.
- `load_G_LM` / `load_G_LM_pairs` / `save_G_LM`: the paper's predefined G_LM pickles, `.pt`
  files and our `.safetensors` layout.

Nothing here executes code from a file: checkpoints load with `torch.load(weights_only=True)`,
and G_LM pickles go through `_TensorOnlyUnpickler`, which admits only the three functions
that rebuild tensors (see reference/README.md, "Predefined G_LM files").

G_LM `.safetensors` layout (written by `save_G_LM`, read by `load_G_LM`): a tensor `G_LM`
[L, H, dk, dk] (one [H, dk, dk] slice per decoder layer), optionally `A_LM` of the same shape,
and the header metadata {"format": "pt", "content": "pldr.G_LM"}. A leading singleton axis,
[L, 1, H, dk, dk], is accepted on reading.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .cache import stack_per_layer
from .config import PLDRConfig
from .devices import parse_dtype, resolve_device
from .errors import CheckpointError, PLDRError, PLDRTypeError
from .files import atomic_path, replace_dir, temp_sibling
from .model import PLDRModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
_PREFIXES = ("module.", "_orig_mod.")          # DDP/FSDP wrappers and torch.compile
_LEARNER_MARKERS = ("plgatt_layer", "reslayerAs")  # only v510 has these keys
_ZIP_MAGIC = b"PK\x03\x04"


def G_LM_key(layer: int) -> str:
    """State-dict key of the fixed G_LM buffer of decoder layer `layer` (v510G)."""
    return f"decoder.dec_layers.{layer}.mha1.G_LM"


# ===== loading a model ==========================================================================

def load_model(path: str | os.PathLike,
               config: PLDRConfig | Mapping | str | os.PathLike | None = None,
               *, G_LM: Tensor | Sequence[Tensor] | str | os.PathLike | None = None,
               device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> PLDRModel:
    """A `PLDRModel` in eval mode from an original checkpoint or a `save_pretrained` directory.

    `config` (a PLDRConfig, an hpdict/config dict or a JSON path) is required for an original
    checkpoint and overrides the directory's `config.json` otherwise. The checkpoint's keys
    decide the variant: without metric-learner keys it is v510G, which needs `G_LM` (tensor,
    list or G_LM file) unless the G_LM buffers are saved with it (our directories)."""
    state, config = read_state(path, config)
    state, G = _attach_G_LM(state, config, G_LM)
    model = _build(config, state, G)
    return _place(model, device, dtype).eval()


def read_state(path: str | os.PathLike, config: Any = None) -> tuple[dict[str, Tensor], PLDRConfig]:
    """The state dict of `path` (prefixes stripped, on CPU) and the config it goes with, its
    variant set from the keys. Reads only tensors; builds no model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    if path.is_dir():
        config = PLDRConfig.resolve(config) if config is not None else _directory_config(path)
        state = read_safetensors(path / WEIGHTS_FILE)
    elif path.suffix == ".safetensors":
        state = read_safetensors(path)
        sibling = path.with_name(CONFIG_FILE)
        if config is None and sibling.is_file():
            config = sibling
        config = _require_config(config, path)
    else:
        state = _state_dict_of(_torch_load(path, "cpu"), path)
        config = _require_config(config, path)
    state = _strip_prefixes(state)
    return state, _config_for_state(config, state)


def _directory_config(directory: Path) -> PLDRConfig:
    """The config.json of a saved model directory (clear error when it is not one)."""
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}; it is not a model "
                              "directory written by save_pretrained (or pass config=...)")
    return PLDRConfig.from_json(directory / CONFIG_FILE)


def _require_config(config: Any, path: Path) -> PLDRConfig:
    """An original checkpoint holds no hyperparameters: the caller must give them."""
    if config is None:
        raise CheckpointError(f"{str(path)!r} holds weights only; pass its config (config= an "
                              "hpdict dict, a PLDRConfig or a JSON path; --config on the CLI)")
    return PLDRConfig.resolve(config)


def _config_for_state(config: PLDRConfig, state: Mapping[str, Tensor]) -> PLDRConfig:
    """The config with its variant set from the keys: no metric-learner keys means v510G."""
    learned = any(m in k for k in state for m in _LEARNER_MARKERS)
    variant = "v510" if learned else "v510G"
    return config if config.variant == variant else config.replace(variant=variant)


def _torch_load(path: Path, device: str | torch.device) -> Any:
    """`torch.load(weights_only=True)` with one-line errors; refuses files that need code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        try:
            return torch.load(path, weights_only=True, map_location=device)
        except pickle.UnpicklingError as e:
            reason = _weights_only_reason(e)
            if "GLOBAL" in reason or _starts_with(path, b"\x80"):  # a pickle torch refuses
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


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, on CPU; a missing or unreadable file is a
    CheckpointError that names it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; a model directory needs "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001  SafetensorError is not a builtin subclass
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {e}") from None


def _state_dict_of(obj: Any, path: Path) -> dict[str, Tensor]:
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


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def _attach_G_LM(state: dict[str, Tensor], config: PLDRConfig,
                 G_LM: Any) -> tuple[dict[str, Tensor], Tensor | None]:
    """Put a given G_LM into the state dict as the v510G buffers; demand one when missing.

    Returns the state and the per-layer G_LM [L, H, dk, dk] that was given (or None)."""
    if config.variant != "v510G":
        if G_LM is not None:
            raise CheckpointError("G_LM is only for v510G checkpoints, and this one is v510 (it "
                                  "has a metric learner); pass G_LM to pldr.generate instead, or "
                                  "use pldr.model.to_v510G for the v510Gi ablation")
        return state, None
    if G_LM is None:
        if all(G_LM_key(i) in state for i in range(config.num_layers)):
            return state, None
        raise CheckpointError("this is a v510G checkpoint and it does not hold G_LM; pass G_LM= "
                              "(a tensor, a list of per-layer tensors or a predefined G_LM file; "
                              "--G-LM on the CLI)")
    if isinstance(G_LM, (str, os.PathLike)):
        G_LM = load_G_LM(G_LM)
    like = state.get("decoder.embedding.weight")  # keep the checkpoint's dtype
    dtype = like.dtype if like is not None else torch.float32
    G = stack_per_layer(G_LM, config, "G_LM")[:, 0].detach().to("cpu", dtype)
    state = dict(state)
    for i in range(config.num_layers):
        state[G_LM_key(i)] = G[i].clone()
    return state, G


def _build(config: PLDRConfig, state: dict[str, Tensor], G: Tensor | None) -> PLDRModel:
    """A model built on the meta device that takes the state's tensors (assign=True)."""
    with torch.device("meta"):
        model = PLDRModel(config, G_LM=G)
    check_state_fits(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal error: {left[0]} was not loaded (still on the meta "
                              "device); please report this")
    return model


def check_state_fits(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raise CheckpointError naming the first missing/unexpected key or mismatching shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hint = "is the config (num_layers, num_reslayerA, num_denseA, variant) right?"
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} key(s) the config needs: "
                              f"{_first_few(missing)}; {hint}")
    if unexpected:
        raise CheckpointError(f"the checkpoint has {len(unexpected)} key(s) the config does not "
                              f"know: {_first_few(unexpected)}; {hint}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint key {key} has shape {list(got.shape)} but the "
                                  f"config needs {list(want.shape)}; is the config right?")
        if not got.is_floating_point():
            raise CheckpointError(f"checkpoint key {key} holds {got.dtype}, not floating-point "
                                  "weights; is this a model checkpoint?")


def _first_few(keys: Sequence[str], n: int = 3) -> str:
    """`a, b, c (and 5 more)`."""
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _place(model: PLDRModel, device: Any, dtype: Any) -> PLDRModel:
    """Move to the device and cast to the dtype (the RoPE tables are float32 regardless)."""
    dtype = parse_dtype(dtype)
    if device is not None:
        device = resolve_device(device, error=CheckpointError)
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if kwargs:
        model.to(**kwargs)
    return model


def inspect_checkpoint(path: str | os.PathLike, config: Any = None) -> dict[str, Any]:
    """What `pldr inspect` shows: variant, parameter count, dtype(s) and config of a
    checkpoint, after checking that every key and shape fits (no G_LM needed)."""
    state, config = read_state(path, config)
    with torch.device("meta"):
        model = PLDRModel(config)
    buffers = {k: t for k, t in model.state_dict().items() if k.endswith(".mha1.G_LM")}
    check_state_fits(model, {**buffers, **state})  # an original v510G file has no G_LM
    return {
        "path": str(path),
        "format": "directory" if Path(path).is_dir() else "file",
        "variant": config.variant,
        "num_parameters": model.num_parameters(),
        "num_tensors": len(state),
        "has_G_LM": config.variant == "v510G" and G_LM_key(0) in state,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
        "config": config.to_dict(),
    }


# ===== saving a model ============================================================================

def save_pretrained(model: PLDRModel, directory: str | os.PathLike, tokenizer: Any = None) -> None:
    """Write `config.json`, `model.safetensors` (and `tokenizer.model`) to `directory`.

    Written into a temporary folder next to it and renamed, so a crash never leaves half a
    model. An existing model directory is replaced; in an existing directory that also holds
    other files, only our files are replaced (each atomically) and the others stay."""
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise PLDRTypeError(f"save_pretrained needs a PLDRModel, got {type(model).__name__}")
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{str(target)!r} exists and is not a directory; choose "
                              "another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the renamed directory
    try:
        write_model_files(model, tmp, tokenizer)
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_files(model: PLDRModel, directory: Path, tokenizer: Any = None, *,
                      weights: bool = True) -> None:
    """config.json, model.safetensors and the tokenizer, into an existing directory.

    Shared by `save_pretrained` and training checkpoints, so both hold the same files.
    `weights=False` leaves out model.safetensors, for a sharded run whose weights are written
    by Distributed Checkpoint instead."""
    from safetensors.torch import save_file

    model.config.to_json(directory / CONFIG_FILE)
    if weights:
        save_file(_plain_tensors(model.state_dict()), directory / WEIGHTS_FILE,
                  metadata={"format": "pt"})
    if tokenizer is not None:
        _write_tokenizer(tokenizer, directory / TOKENIZER_FILE)


def _plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies-where-needed that safetensors accepts: no two share memory."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _write_tokenizer(tokenizer: Any, dest: Path) -> None:
    """A tokenizer object with `.save(path)`, a SentencePieceProcessor, or a .model path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file {str(src)!r} does not exist")
        shutil.copyfile(src, dest)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(str(dest))
    elif hasattr(tokenizer, "serialized_model_proto"):
        dest.write_bytes(tokenizer.serialized_model_proto())
    else:
        raise PLDRTypeError(f"tokenizer must be a path to a .model file or have a .save(path) "
                            f"method, got {type(tokenizer).__name__}")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished temporary folder to `target`, replacing what is there safely."""
    ours = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}
    if not target.exists() or {p.name for p in target.iterdir()} <= ours:
        replace_dir(tmp, target)  # no folder, an old model or an empty one: swap it out whole
        return
    for name in (WEIGHTS_FILE, TOKENIZER_FILE, CONFIG_FILE):  # config last: it marks "done"
        if (tmp / name).exists():
            os.replace(tmp / name, target / name)


# ===== G_LM files ================================================================================

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
    if not path.is_file():
        raise CheckpointError(f"G_LM file {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors(path)
    elif _starts_with(path, _ZIP_MAGIC):
        obj = _torch_load(path, device)
    else:
        obj = _restricted_unpickle(path, device)
        if isinstance(obj, int):  # legacy (non-zip) torch.save: a magic number comes first
            obj = _torch_load(path, device)
    A_LM, G_LM = _pairs_of(obj, path)
    move = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
    return move(A_LM), move(G_LM)


def save_G_LM(G_LM: Tensor | Sequence[Tensor], path: str | os.PathLike,
              A_LM: Tensor | Sequence[Tensor] | None = None) -> None:
    """Write per-layer G_LM (and optionally A_LM) as a `.safetensors` file that `load_G_LM`
    reads: tensors `G_LM` (and `A_LM`) [L, H, dk, dk], metadata content "pldr.G_LM"."""
    from safetensors.torch import save_file

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
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "content": "pldr.G_LM"})


def _stack_layers(tensors: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """Per-layer tensors as one contiguous CPU float tensor [L, H, dk, dk]."""
    layers = _per_layer(tensors, name, Path(name))
    return torch.stack([t[0] for t in layers]).detach().to("cpu").contiguous()


def _starts_with(path: Path, magic: bytes) -> bool:
    """Whether the file's first bytes are `magic`."""
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _pairs_of(obj: Any, path: Path) -> tuple[list[Tensor] | None, list[Tensor]]:
    """(A_LM or None, G_LM) from whatever structure the file held."""
    if isinstance(obj, Mapping):
        if "G_LM" not in obj:
            raise CheckpointError(f"{str(path)!r} has no 'G_LM' entry (found "
                                  f"{_first_few([str(k) for k in obj])}); see save_G_LM")
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


# ----- the restricted unpickler ----------------------------------------------------------------

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


def _restricted_unpickle(path: Path, device: str | torch.device) -> Any:
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


__all__ = ["load_model", "save_pretrained", "load_G_LM", "load_G_LM_pairs", "save_G_LM",
           "inspect_checkpoint", "read_state", "check_state_fits", "G_LM_key", "parse_dtype",
           "read_safetensors", "write_model_files"]
