"""`load_model`: any supported layout -> a `PLDRModel` (or, for a directory that holds a
task head, the head model of model/heads.py) in eval mode, built on the meta device so the
loaded tensors are used as they are (no second copy, no random init); and
`inspect_checkpoint`, what `pldr info` shows.

Which model a directory holds is what its config.json's `architectures` names: a
`...ForSequenceClassification`, `...ForTokenClassification` or `...ForQuestionAnswering`
(ours, the port's or pldr.hf's) is that head; anything else, or none, is the causal LM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..devices import load_dtype, parse_dtype, resolve_device
from ..errors import CheckpointError, PLDRError
from ..model.cache import GivenG
from ..model.heads import head_class
from ..model.model import PLDRModel
from ..model.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    directory_config,
    verify_manifest,
    read_safetensors,
)
from ..model.quantize import for_decoding
from .glm import load_G_LM
from .hf_port import (
    PORT_MODEL_TYPE,
    config_from_port,
    read_port_config,
    read_port_weights,
    state_from_port,
)
from .original import (
    config_for_state,
    first_few,
    require_config,
    state_dict_of,
    strip_prefixes,
    torch_load,
)


# the file that marks a Distributed Checkpoint folder (a `pldr train` checkpoint)
DCP_METADATA = ".metadata"


def G_LM_key(layer: int) -> str:
    """State-dict key of the fixed G_LM buffer of decoder layer `layer` (v510G)."""
    return f"decoder.dec_layers.{layer}.mha1.G_LM"


def load_model(path: str | os.PathLike,
               config: PLDRConfig | Mapping | str | os.PathLike | None = None,
               *, G_LM: Tensor | Sequence[Tensor] | str | os.PathLike | None = None,
               device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> PLDRModel:
    """A `PLDRModel` in eval mode from an original checkpoint, a `save_pretrained` directory
    or a directory of the transformers port (config.json with model_type "pldrllm"); the
    head model (`PLDRForSequenceClassification`, ...) when the directory holds a task head.

    `config` (a PLDRConfig, an hpdict/config dict or a JSON path) is required for an original
    checkpoint and overrides the directory's `config.json` otherwise. The checkpoint's keys
    decide the variant: without metric-learner keys it is v510G, which needs `G_LM` (tensor,
    list or G_LM file) unless the G_LM buffers are saved with it (our directories). An
    adapter directory (`pldr finetune --lora-r`) loads its base model with the adapters."""
    from .adapters import is_adapter_dir, load_adapter

    if is_adapter_dir(path):
        return load_adapter(path, load_model, device=device, dtype=dtype)
    state, config = read_state(path, config)
    state, G = _attach_G_LM(state, config, G_LM)
    model = _build(config, state, G, model_class(path))
    return _place(model, device, dtype).eval()


def model_class(path: str | os.PathLike) -> type[torch.nn.Module]:
    """The class a checkpoint holds: the head that a directory's config.json names in
    `architectures`, else PLDRModel (original checkpoints never hold a head)."""
    path = Path(path)
    config = path / CONFIG_FILE if path.is_dir() else None
    if config is None or not config.is_file():
        return PLDRModel
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return PLDRModel  # read_state names the unreadable file
    architectures = d.get("architectures") if isinstance(d, dict) else None
    return head_class(architectures if isinstance(architectures, list) else None) or PLDRModel


def require_causal(path: str | os.PathLike, purpose: str) -> None:
    """Refuse a task-head checkpoint where a causal LM is needed, naming the head."""
    cls = model_class(path)
    if cls is not PLDRModel:
        raise CheckpointError(f"{str(path)!r} holds a {cls.task} model ({cls.__name__}), "
                              f"which has no language-model head; {purpose} needs a causal "
                              "PLDR-LLM")


def load_for_inference(path: str | os.PathLike,
                       config: PLDRConfig | Mapping | str | os.PathLike | None = None,
                       *, G_LM: Tensor | Sequence[Tensor] | str | os.PathLike | None = None,
                       device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None
                       ) -> tuple[PLDRModel, GivenG | None]:
    """A model and the G_LM to generate with, from one read of the checkpoint.

    A given G_LM (tensor, list or file) wins in either variant: a v510G model takes it as its
    buffers (an original v510G .pth needs it to load at all; a directory's saved G_LM is
    replaced), and for a v510 model it is returned, to be given to generation: a `GivenG`,
    checked once here (a sequence of the per-layer [1, H, dk, dk] tensors, as `load_G_LM`
    returns them)."""
    if isinstance(G_LM, (str, os.PathLike)):
        G_LM = load_G_LM(G_LM)
    from .adapters import is_adapter_dir, load_adapter, merge_lora

    if is_adapter_dir(path):  # a causal LoRA adapter: its base model with the adapters merged
        model = merge_lora(load_adapter(path, load_model, device=device, dtype=dtype))
        if not isinstance(model, PLDRModel):
            raise PLDRError(f"{str(path)!r} adapts a {type(model).__name__}; generation needs "
                            "a causal model")
        given = None if G_LM is None else GivenG.check(G_LM, model.config)
        return model.requires_grad_(False).eval(), given
    require_causal(path, "generation")
    state, config = read_state(path, config)
    given = None if G_LM is None else GivenG.check(G_LM, config)  # the one check
    G = None
    if config.variant == "v510G":
        state, G = _attach_G_LM(state, config, given)
    return _place(_build(config, state, G), device, dtype).eval(), given


def load_for_decoding(path: str | os.PathLike,
                      config: PLDRConfig | Mapping | str | os.PathLike | None = None, *,
                      G_LM: Tensor | Sequence[Tensor] | str | os.PathLike | None = None,
                      device: str | torch.device | None = None,
                      dtype: str = "float32") -> tuple[PLDRModel, GivenG | None]:
    """`load_for_inference` for an inference dtype name (generate's and serve's `dtype`):
    int8 loads float32 weights on the CPU and quantises them; bfloat16 on a CPU packs its
    weights for oneDNN, or falls back to float32 (with a warning) where the CPU has no
    native bf16."""
    if dtype == "int8" and device not in (None, "cpu"):
        raise PLDRError(f"`dtype='int8'` runs on CPU only, not `device={device!r}`; use "
                        "`device='cpu'`, or `dtype='float32'` or 'bfloat16'")
    device = resolve_device("cpu" if dtype == "int8" else device)
    model, G = load_for_inference(path, config, G_LM=G_LM, device=device,
                                  dtype=load_dtype(dtype, device))
    return for_decoding(model, dtype), G


def require_existing(path: str | os.PathLike) -> Path:
    """`path` as a Path, or a CheckpointError naming it when nothing is there."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    return path


def checkpoint_layout(path: str | os.PathLike) -> str:
    """Which layout `path` is in, as `pldr convert --to` names them: "hf-port" (a directory
    of the transformers port), "pldr" (our directory, or a lone .safetensors file) or
    "original" (a .pth checkpoint); read from config.json only, no tensors."""
    path = Path(path)
    if path.is_dir():
        return "hf-port" if read_port_config(path) is not None else "pldr"
    return "pldr" if path.suffix == ".safetensors" else "original"


def read_state(path: str | os.PathLike, config: Any = None) -> tuple[dict[str, Tensor], PLDRConfig]:
    """The state dict of `path` (prefixes stripped, on CPU) and the config it goes with, its
    variant set from the keys. Reads only tensors; builds no model."""
    path = require_existing(path)
    if path.is_dir():
        if (path / DCP_METADATA).is_file() and not (path / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{str(path)!r} is a resumable training checkpoint "
                                  "(Distributed Checkpoint), not a model directory; convert it "
                                  f"with `pldr convert --dcp {path} --out MODEL_DIR` (in Python: "
                                  "pldr.training.checkpointing.dcp_to_pretrained)")
        state, config = _read_directory(path, config)
    elif path.suffix == ".safetensors":
        state = read_safetensors(path)
        sibling = path.with_name(CONFIG_FILE)
        if config is None and sibling.is_file():
            config = sibling
        config = require_config(config, path)
    else:
        state = state_dict_of(torch_load(path, "cpu"), path)
        config = require_config(config, path)
    state = strip_prefixes(state)
    return state, config_for_state(config, state)


def _read_directory(path: Path, config: Any) -> tuple[dict[str, Tensor], PLDRConfig]:
    """A model directory in our layout (model_type "pldr_llm") or the transformers port's
    ("pldrllm"); anything else is refused with a line that names both."""
    port = read_port_config(path)
    if port is not None:
        config = PLDRConfig.resolve(config) if config is not None else config_from_port(port)
        return state_from_port(read_port_weights(path), config), config
    model_type = _model_type(path / CONFIG_FILE)
    if model_type not in (None, "pldr_llm") or (config is None and not (path / CONFIG_FILE).is_file()):
        found = f"its config.json has model_type {model_type!r}" if model_type else "it has no config.json"
        raise CheckpointError(f"{str(path)!r} is in neither model layout pldr reads ({found}): a "
                              f"pldr directory (config.json with model_type {'pldr_llm'!r} + "
                              f"{WEIGHTS_FILE}) or the transformers port's (model_type "
                              f"{PORT_MODEL_TYPE!r}); point at such a directory, or at an "
                              "original .pth with config=")
    config = PLDRConfig.resolve(config) if config is not None else directory_config(path)
    verify_manifest(path)
    return read_safetensors(path / WEIGHTS_FILE), config


def _model_type(path: Path) -> str | None:
    """The `model_type` of a JSON config file (None when absent or unreadable)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d.get("model_type") if isinstance(d, dict) else None


def _attach_G_LM(state: dict[str, Tensor], config: PLDRConfig,
                 G_LM: Any) -> tuple[dict[str, Tensor], GivenG | None]:
    """Put a given G_LM into the state dict as the v510G buffers; demand one when missing.

    Returns the state and the G_LM that was given (or None), as a `GivenG` (checked here
    unless it arrives as one)."""
    if config.variant != "v510G":
        if G_LM is not None:
            raise CheckpointError("G_LM is only for v510G checkpoints, and this one is v510 (it "
                                  "has a metric learner); pass G_LM to pldr.generate instead, or "
                                  "use pldr.model.to_v510G for the v510Gi ablation")
        return state, None
    if G_LM is None:
        if all(G_LM_key(i) in state for i in range(config.num_layers)):
            return state, None
        raise CheckpointError("this is a v510G checkpoint and it does not hold G_LM; pass `G_LM` "
                              "(a tensor, a list of per-layer tensors or a predefined G_LM file)")
    if isinstance(G_LM, (str, os.PathLike)):
        G_LM = load_G_LM(G_LM)
    like = state.get("decoder.embedding.weight")  # keep the checkpoint's dtype
    dtype = like.dtype if like is not None else torch.float32
    G = GivenG.check(G_LM, config).G_LM.detach().to("cpu", dtype)
    state = dict(state)
    for i in range(config.num_layers):
        state[G_LM_key(i)] = G[i].clone()
    return state, GivenG(G)


def _build(config: PLDRConfig, state: dict[str, Tensor], G: GivenG | None,
           cls: type[torch.nn.Module] = PLDRModel) -> PLDRModel:
    """A model of `cls` (PLDRModel or a head) built on the meta device that takes the
    state's tensors (assign=True)."""
    with torch.device("meta"):
        model = cls(config, G_LM=G)
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
                              f"{first_few(missing)}; {hint}")
    if unexpected:
        raise CheckpointError(f"the checkpoint has {len(unexpected)} key(s) the config does not "
                              f"know: {first_few(unexpected)}; {hint}")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint key {key} has shape {list(got.shape)} but the "
                                  f"config needs {list(want.shape)}; is the config right?")
        if not got.is_floating_point():
            raise CheckpointError(f"checkpoint key {key} holds {got.dtype}, not floating-point "
                                  "weights; is this a model checkpoint?")



def _place(model: PLDRModel, device: Any, dtype: Any) -> PLDRModel:
    """Move to the device and cast to the dtype (the RoPE tables are float32 regardless)."""
    dtype = parse_dtype(dtype)
    if device is not None:
        device = resolve_device(device, error=CheckpointError)
    if device is not None and device.type == "cuda":  # CPU: the weights are read already
        from ..model.memory import MemoryEstimate, check_fits

        size = torch.empty((), dtype=dtype or model.dtype).element_size()
        check_fits(MemoryEstimate((("weights", model.num_parameters() * size),)), device,
                   "use a smaller `dtype` (bfloat16, int8) or `device='cpu'`", "the model")
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if kwargs:
        model.to(**kwargs)
    return model


def inspect_checkpoint(path: str | os.PathLike, config: Any = None) -> dict[str, Any]:
    """What `pldr inspect` shows: variant, parameter count, dtype(s) and config of a
    checkpoint, after checking that every key and shape fits (no G_LM needed)."""
    state, config = read_state(path, config)
    cls = model_class(path)
    with torch.device("meta"):
        model = cls(config)
    buffers = {k: t for k, t in model.state_dict().items() if k.endswith(".mha1.G_LM")}
    check_state_fits(model, {**buffers, **state})  # an original v510G file has no G_LM
    return {
        "path": str(path),
        "format": "directory" if Path(path).is_dir() else "file",
        "variant": config.variant,
        "task": getattr(cls, "task", "causal"),
        "num_parameters": model.num_parameters(),
        "num_tensors": len(state),
        "has_G_LM": config.variant == "v510G" and G_LM_key(0) in state,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
        "config": config.to_dict(),
    }
