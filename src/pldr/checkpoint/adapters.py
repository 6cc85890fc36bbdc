"""LoRA adapters (through peft) and adapter directories, which `load_model` reads wherever a
model loads.

    add_lora(model, r, alpha, dropout, targets)  LoRA on the named linear layers, in place;
                                                 every other weight is frozen
    merge_lora(model)                            the adapters folded into their layers
    save_adapter(model, dir, base, ...)          an adapter directory:
        adapter_config.json      peft's LoraConfig, base_model_name_or_path = the base model
        adapter_model.safetensors  the adapter weights and every other trained tensor (a new
                                   head), under the model's own parameter names
        pldr_adapter.json        the model config (with the head's labels) and the class
        tokenizer.model
    load_adapter(dir, load_model) base model (load_model) -> its head, if the adapter has one
                                 -> LoRA -> the saved tensors; eval mode

`attach_head(model, cls, config)` puts a task head on a causal model's decoder (shared by
fine-tuning and adapter loading).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..config import PLDRConfig
from ..errors import CheckpointError, ConfigError, import_extra
from ..files import atomic_write_text, replace_dir, temp_sibling
from ..model.pretrained import TOKENIZER_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "pldr_adapter.json"
ADAPTER_FORMAT = "pldr-adapter"


def _peft() -> Any:
    return import_extra("peft", "finetune", "LoRA adapters")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter directory written by `save_adapter`."""
    return (Path(path) / ADAPTER_META).is_file()


def lora_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear layers of `model` whose last name part is one of `targets`; a
    target that names no linear layer is a ConfigError listing the names there are."""
    linear = {name: name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, nn.Linear)}
    for t in targets:
        if t not in linear.values():
            raise ConfigError(f"`lora_targets` entry {t!r} matches no linear layer of the model; its "
                              f"linear layers are named {', '.join(sorted(set(linear.values())))}")
    return [name for name, last in linear.items() if last in targets]


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float,
             targets: Sequence[str], train: Sequence[str] = ()) -> nn.Module:
    """LoRA of rank `r` (updates scaled alpha / r) on the linear layers named `targets`, in
    place: every parameter is frozen except the adapters and the modules named in `train`
    (a new head, e.g. "score"). The adapters start as a zero update (B = 0)."""
    peft = _peft()
    modules = lora_modules(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=modules)
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.split(".")[0] in train)
    model.lora_config = config  # what save_adapter writes
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its linear layer and put the plain layer back, in place:
    the model's state dict is then the plain model's."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_state(model: nn.Module, full_state: dict[str, Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """The trained tensors of a LoRA model (adapters and trainable modules), by name."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = full_state if full_state is not None else model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in names}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base: str,
                 state: dict[str, Tensor] | None = None, tokenizer: Any = None) -> Path:
    """Write an adapter directory (see the module docstring) for a model that `add_lora`
    changed; `base` is the base model's path (stored absolute), `state` the full state dict
    when the model itself holds shards."""
    from safetensors.torch import save_file

    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        lora = model.lora_config.to_dict()
        lora["target_modules"] = sorted(lora["target_modules"])
        lora["base_model_name_or_path"] = str(Path(base).absolute()) \
            if Path(base).exists() else base
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(lora, indent=2, default=str) + "\n")
        save_file(trainable_state(model, state), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        meta = {"format": ADAPTER_FORMAT, "version": 1, "class": type(model).__name__,
                "config": model.config.to_dict()}
        atomic_write_text(tmp / ADAPTER_META, json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target


def attach_head(model: nn.Module, cls: type, config: PLDRConfig) -> nn.Module:
    """A `cls` head model (freshly initialised head) over `model`'s decoder weights; `config`
    is `model`'s config with the head's labels."""
    head = cls(config)
    missing = head.decoder.load_state_dict(model.decoder.state_dict(), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise CheckpointError(f"the model's decoder does not fit a {cls.__name__}: "
                              f"{(missing.missing_keys + missing.unexpected_keys)[:3]}")
    return head.to(next(model.parameters()).device)


def load_adapter(path: str | os.PathLike, load_model: Any, *, device: Any = None,
                 dtype: Any = None) -> nn.Module:
    """The model of an adapter directory: its base model (read by `load_model`, which
    passes itself in), with the head the adapter was trained with, LoRA, and the adapter's
    tensors; in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / ADAPTER_META).read_text(encoding="utf-8"))
        lora = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the adapter directory {str(path)!r}: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{str(path / ADAPTER_META)!r} is not a pldr adapter file")
    base = lora.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise CheckpointError(f"the adapter {str(path)!r} names its base model {base!r}, which "
                              "does not exist here; put the base model there or edit "
                              f"base_model_name_or_path in {ADAPTER_CONFIG}")
    config = PLDRConfig.from_dict(meta["config"])
    model = load_model(base, device="cpu")
    if type(model).__name__ != meta["class"]:
        from ..model import heads

        model = attach_head(model, getattr(heads, meta["class"]), config)
    add_lora(model, int(lora["r"]), float(lora["lora_alpha"]), float(lora["lora_dropout"]),
             sorted({t.rsplit(".", 1)[-1] for t in lora["target_modules"]}))
    state = load_file(path / ADAPTER_WEIGHTS, device="cpu")
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"the adapter {str(path)!r} holds {unknown[0]!r}, which its base "
                              f"model {base!r} does not have: the base model changed")
    model.load_state_dict(state, strict=False)
    if dtype is not None or device is not None:
        from ..devices import parse_dtype, resolve_device

        model.to(device=resolve_device(device), dtype=parse_dtype(dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_META", "is_adapter_dir",
           "lora_modules", "add_lora", "merge_lora", "trainable_state", "save_adapter",
           "attach_head", "load_adapter"]
