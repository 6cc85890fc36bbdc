"""Writing a model in each layout pldr reads, for `pldr convert --to`:

- `pldr`: our directory (`save_pretrained`);
- `original`: the original release's files, so work done here can go back to its code:
  `checkpoint.pth` ({"model_state_dict": ...}, as the original saves it), `hpdict.json` and,
  for v510G, `G_LM.pkl` (a plain pickle of L tensors [1, H, dk, dk], the format of the paper's
  predefined G_LM files);
- `hf-port`: the transformers port's directory (config.json with model_type "pldrllm",
  generation_config.json, model.safetensors; v510G's G_LM in the port's buffers).

Every layout holds the weights bit for bit. The original has only interleaved RoPE, so a
rotate-half (v52) model goes there as its exact interleaved twin: the dk axis permuted per head
wherever it appears (`permute_rope_style`; docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import CheckpointError
from ..files import replace_dir, temp_sibling
from ..model.heads import is_head_model
from ..model.pretrained import TOKENIZER_FILE, _plain_tensors, _write_tokenizer
from .hf_port import PORT_TOKENIZER_CONFIG, write_port_files, write_port_tokenizer_config

LAYOUTS = ("pldr", "original", "hf-port")
ORIGINAL_CHECKPOINT, ORIGINAL_HPDICT, ORIGINAL_G_LM = "checkpoint.pth", "hpdict.json", "G_LM.pkl"
# what the original hard-codes: a config that differs cannot go there
_ORIGINAL_FIXED = {"rope_base": 10000.0, "layernorm_eps": 1e-6, "pad_id": 0}


# ----- the RoPE permutation --------------------------------------------------------------------

def rope_permutation(dk: int) -> Tensor:
    """perm = [0, h, 1, h+1, ..., h-1, 2h-1] (h = dk/2): interleaved pair (2i, 2i+1) holds
    rotate-half pair (i, i+h), so RoPE_interleaved(x[perm]) = RoPE_half(x)[perm]."""
    h = dk // 2
    return torch.stack((torch.arange(h), torch.arange(h, dk)), dim=1).flatten()


def permute_rope_style(state: Mapping[str, Tensor], config: PLDRConfig,
                       to: str) -> tuple[dict[str, Tensor], PLDRConfig]:
    """The same model in the other RoPE style: every dk axis of the queries' side permuted
    per head (new[..., j] = old[..., perm[j]] from half to interleaved, the inverse back).

    Exact (a permutation); keys, values, the feed-forward and all D-sized tensors stay."""
    if config.rope_style == to:
        return dict(state), config
    perm = rope_permutation(config.dk)
    if to == "half":
        perm = torch.argsort(perm)
    H, dk = config.num_heads, config.dk
    out = {}
    for key, t in state.items():
        if key.endswith(("mha1.wq.weight", "mha1.wk.weight")):
            t = t.view(H, dk, -1)[:, perm].reshape(t.shape)
        elif key.endswith(("mha1.wq.bias", "mha1.wk.bias")):
            t = t.view(H, dk)[:, perm].reshape(t.shape)
        elif ".mha1.layernorm1." in key or ".layernormA." in key:
            t = t[perm]
        elif ".denseAs." in key and key.endswith(("gluw1.weight", "gluw2.weight")):
            t = t[:, perm]
        elif ".denseAs." in key and ".gluw3." in key:
            t = t[perm]
        elif ".plgatt_layer." in key or key.endswith("mha1.G_LM"):
            t = t[:, perm][:, :, perm]
        out[key] = t.contiguous()
    return out, config.replace(rope_style=to)


# ----- writers ----------------------------------------------------------------------------------

def convert_model(model: Any, dest: str | os.PathLike, to: str, tokenizer: Any = None) -> Path:
    """Write `model` (a PLDRModel, or a task head for pldr and hf-port) to the directory
    `dest` in layout `to` (one of LAYOUTS).

    Written into a temporary folder next to `dest` and renamed; an existing `dest` is replaced
    only when it is empty or holds a model of one of these layouts."""
    from ..model.pretrained import save_pretrained

    if to not in LAYOUTS:
        raise CheckpointError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    if to == "original" and is_head_model(model):
        raise CheckpointError(f"the original release has no task heads, so a {model.task} "
                              "model cannot be written in its layout; use `to='pldr'` or `to='hf-port'`")
    target = Path(dest).absolute()
    if to == "pldr":
        save_pretrained(model, target, tokenizer=tokenizer)
        return target
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        if to == "original":
            write_original_files(model, tmp)
        else:
            write_port_files(model, tmp)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp / TOKENIZER_FILE, model.config.vocab_size)
            if to == "hf-port":  # so AutoTokenizer finds PLDRTokenizer (import pldr.hf)
                write_port_tokenizer_config(model.config, tmp)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_original_files(model: Any, directory: Path) -> None:
    """checkpoint.pth + hpdict.json (+ G_LM.pkl for v510G) of the original release."""
    config = model.config
    for name, value in _ORIGINAL_FIXED.items():
        if getattr(config, name) != value:
            raise CheckpointError(f"the original code fixes {name}={value!r} and this model has "
                                  f"{getattr(config, name)!r}; it cannot be written in the "
                                  "original layout (use `to='pldr'` or `to='hf-port'`)")
    state, config = permute_rope_style(_plain_tensors(model.state_dict()), config, "interleaved")
    G_keys = [k for k in state if k.endswith("mha1.G_LM")]
    G = [state.pop(k)[None].clone() for k in sorted(G_keys, key=_layer_of)]  # L x [1, H, dk, dk]
    torch.save({"model_state_dict": state}, directory / ORIGINAL_CHECKPOINT)
    (directory / ORIGINAL_HPDICT).write_text(json.dumps(config.to_hpdict(), indent=2) + "\n")
    if G:
        with open(directory / ORIGINAL_G_LM, "wb") as f:
            pickle.dump(G, f, protocol=5)  # what the original's predefined G_LM files are


def _layer_of(key: str) -> int:
    """The layer index of a `decoder.dec_layers.{i}....` key."""
    return int(key.split(".")[2])


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a file, or a folder that holds anything but a model."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{str(target)!r} exists and is not a directory; choose another "
                              "`dest`")
    model_files = {"config.json", "model.safetensors", "generation_config.json",
                   "tokenizer.model", PORT_TOKENIZER_CONFIG, ORIGINAL_CHECKPOINT, ORIGINAL_HPDICT, ORIGINAL_G_LM}
    if target.is_dir():
        others = sorted(p.name for p in target.iterdir() if p.name not in model_files)
        if others:
            raise CheckpointError(f"{str(target)!r} holds other files ({', '.join(others[:3])}); "
                                  "choose an empty or new `dest`")


__all__ = ["LAYOUTS", "convert_model", "permute_rope_style", "rope_permutation",
           "write_original_files"]
