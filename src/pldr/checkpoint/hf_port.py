"""The layout of the PLDR-LLM port for transformers (`model_type: "pldrllm"`), in which
PLDR-LLM-v51-*, PLDR-LLM-v52-* and PLDR-LLM-v51G-* are published on the Hugging Face hub.

A port directory holds `config.json` (the port's `PldrllmConfig`) and `model.safetensors`.
Its parameter names are the original's, which are ours, so the weights need no renaming
(tests/fixtures/hfport/README.md). Two things differ:
- `reference_rope: false` (v52) means rotate-half RoPE: our `rope_style="half"`;
- a v51G model (`custom_G_type` set) stores its G_LM in the buffer `decoder.past_G_values`
  [L, 3, 1, H, dk, dk] (slot 2; slots 0 and 1 are zero placeholders for A and A_LM) with a
  bool `decoder.past_G_values_status` [L]; we keep G_LM per layer in
  `decoder.dec_layers.{l}.mha1.G_LM` [H, dk, dk].
What the port can express but we cannot (no biases, RoPE scaling, tied embeddings, other
activations) is refused with an error that names the key.

The port's task heads (`PldrllmForSequenceClassification`, `...ForTokenClassification`,
`...ForQuestionAnswering`) keep the decoder's keys and add `score.*` / `qa_outputs.*` instead
of `final_layer.*`; their labels (`id2label`, `label2id`, `problem_type`,
`classifier_dropout`) map onto PLDRConfig's head fields. A head directory has no
generation_config.json.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..config import PLDRConfig
from ..errors import CheckpointError

log = logging.getLogger("pldr")

PORT_MODEL_TYPE = "pldrllm"
PORT_ARCHITECTURE = "PldrllmForCausalLM"
PORT_TOKENIZER_CONFIG = "tokenizer_config.json"
# the transformers class of the paper's tokenizer, which `import pldr.hf` registers
TOKENIZER_CLASS = "PLDRTokenizer"
G_BUFFER = "decoder.past_G_values"
G_STATUS = "decoder.past_G_values_status"

# keys every PretrainedConfig may carry, and port keys that only steer runtime behaviour
_IGNORED = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "model_type",
    "_name_or_path", "auto_map", "initializer_range", "use_cache", "output_pldr_attentions",
    "output_attentions", "output_hidden_states", "return_dict", "bos_token_id",
    "attention_dropout", "cache_first_G", "_attn_implementation_autoset", "is_decoder",
    "rope_type", "label2id",
})
# the head keys of a PretrainedConfig that PLDRConfig carries (label2id is id2label's inverse)
_HEAD_KEYS = ("id2label", "num_labels", "problem_type", "classifier_dropout")
# port key -> (the value we need, why) for what our model cannot represent otherwise
_REQUIRED = {
    "attention_bias": (True, "our attention projections always have biases"),
    "glu_bias": (True, "our GLUs always have biases"),
    "final_bias": (True, "our output layer always has a bias"),
    "tie_word_embeddings": (False, "our output layer is not tied to the embedding"),
    "hidden_act": ("silu", "our GLUs use SiLU (SwiGLU)"),
}
_PORT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 896, "intermediate_size": 2389,
                  "num_hidden_layers": 5, "num_attention_heads": 14, "head_dim": 64,
                  "max_position_embeddings": 1024, "layer_norm_eps": 1e-6,
                  "pad_token_id": 0, "eos_token_id": 3, "rope_theta": 10000.0,
                  "reference_rope": True, "num_reslayerA": 8, "num_denseA": 2, "A_dff": 170,
                  "custom_G_type": None}


def is_port_config(d: Any) -> bool:
    """Whether a parsed config.json is the port's (model_type "pldrllm")."""
    return isinstance(d, Mapping) and d.get("model_type") == PORT_MODEL_TYPE


# ----- config ---------------------------------------------------------------------------------

def config_from_port(d: Mapping[str, Any]) -> PLDRConfig:
    """Our PLDRConfig for the port's config.json `d` (missing keys take the port's defaults).

    The padding fix stays on (`metric_includes_pad=False`): the port, like the original,
    sums the metric tensor over pad positions too; pass a config with
    `metric_includes_pad=True` to reproduce it."""
    d = {**_PORT_DEFAULTS, **d}
    for key, (need, why) in _REQUIRED.items():
        if key in d and d[key] != need:
            raise CheckpointError(f"port config {key}={d[key]!r} cannot be represented: {why} "
                                  f"(needs {need!r})")
    theta = _rope_theta(d)
    H, dk = d["num_attention_heads"], d["head_dim"]
    D = d["hidden_size"] if d["hidden_size"] is not None else H * dk
    if D != H * dk:
        raise CheckpointError(f"port config hidden_size={D} is not num_attention_heads * head_dim "
                              f"= {H} * {dk}; pldr needs head_dim = hidden_size / heads")
    dff = d["intermediate_size"]
    if dff is None:
        dff = int(math.floor(H * dk * 4 * 2 / 3))
    unknown = sorted(set(d) - set(_PORT_DEFAULTS) - set(_REQUIRED) - _IGNORED
                     - {"rope_scaling", "rope_parameters"} - set(_HEAD_KEYS))
    if unknown:
        log.warning("ignoring port config key(s) %s", ", ".join(unknown))
    if d.get("cache_first_G"):
        log.info("port config cache_first_G=true is ignored: pldr keeps one G_LM per row")
    learned = d["custom_G_type"] is None
    return PLDRConfig(
        num_layers=d["num_hidden_layers"], d_model=D, num_heads=H, dff=dff,
        num_reslayerA=d["num_reslayerA"], num_denseA=d["num_denseA"], A_dff=d["A_dff"],
        vocab_size=d["vocab_size"], max_seq_len=d["max_position_embeddings"],
        variant="v510" if learned else "v510G", rope_base=float(theta),
        layernorm_eps=float(d["layer_norm_eps"]), pad_id=_one_id(d, "pad_token_id"),
        eos_id=_one_id(d, "eos_token_id"),
        rope_style="interleaved" if d["reference_rope"] else "half", **_head_fields(d))


def _head_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """PLDRConfig's head fields from a port config (only those it sets)."""
    out = {k: d[k] for k in _HEAD_KEYS if d.get(k) is not None}
    if "id2label" in out:
        out["num_labels"] = len(out["id2label"])
    if isinstance(out.get("classifier_dropout"), int):
        out["classifier_dropout"] = float(out["classifier_dropout"])
    return out


def _rope_theta(d: Mapping[str, Any]) -> float:
    """rope_theta from `rope_parameters` (transformers 5.x) or `rope_theta`; RoPE scaling is
    refused (pldr has none)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    kind = params.get("rope_type", "default") if isinstance(params, Mapping) else "default"
    if scaling or kind != "default":
        raise CheckpointError(f"port config asks for RoPE scaling ({scaling or params}); pldr "
                              "implements plain RoPE only")
    return params.get("rope_theta", d["rope_theta"])


def _one_id(d: Mapping[str, Any], key: str) -> int:
    """A token id of the port config (a one-element list is accepted)."""
    value = d[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"port config {key}={value!r} must be one token id")
    return value


def config_to_port(config: PLDRConfig, dtype: torch.dtype,
                   architecture: str = PORT_ARCHITECTURE) -> dict[str, Any]:
    """The port's config.json for `config` (weights of `dtype`) and the port's class
    `architecture`; a head's labels as transformers writes them."""
    c = config
    learned = c.variant == "v510"
    if c.metric_includes_pad:
        log.info("metric_includes_pad is not a key of the port (which always includes pads)")
    return {
        "architectures": [architecture], "model_type": PORT_MODEL_TYPE,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.dff,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "head_dim": c.dk, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "layer_norm_eps": c.layernorm_eps, "use_cache": True, "initializer_range": 0.02,
        "output_pldr_attentions": False,
        "pad_token_id": c.pad_id, "bos_token_id": 2, "eos_token_id": c.eos_id,
        "tie_word_embeddings": False, "rope_theta": c.rope_base,
        "rope_parameters": {"rope_theta": c.rope_base, "rope_type": "default"},
        "attention_bias": True, "glu_bias": True, "final_bias": True,
        "reference_rope": c.rope_style == "interleaved", "attention_dropout": 0.0,
        "num_reslayerA": c.num_reslayerA, "num_denseA": c.num_denseA, "A_dff": c.A_dff,
        "custom_G_type": None if learned else "external", "cache_first_G": False,
        "dtype": str(dtype).removeprefix("torch."), **_head_keys(config, architecture),
    }


def _head_keys(config: PLDRConfig, architecture: str) -> dict[str, Any]:
    """id2label / label2id (a head's, or any config's non-default ones), problem_type and
    classifier_dropout where set."""
    if architecture == PORT_ARCHITECTURE and not config.has_head_fields():
        return {}
    out: dict[str, Any] = {"id2label": {str(i): n for i, n in config.id2label.items()},
                           "label2id": config.label2id}
    if config.problem_type is not None:
        out["problem_type"] = config.problem_type
    if config.classifier_dropout != PLDRConfig.__dataclass_fields__["classifier_dropout"].default:
        out["classifier_dropout"] = config.classifier_dropout
    return out


# ----- weights --------------------------------------------------------------------------------

def _G_key(layer: int) -> str:
    return f"decoder.dec_layers.{layer}.mha1.G_LM"


def state_from_port(state: Mapping[str, Tensor], config: PLDRConfig) -> dict[str, Tensor]:
    """The port's state dict in our names: v51G's G buffer becomes per-layer G_LM buffers
    (slot 2 of `past_G_values`), its status flags are dropped. Without the buffer a v51G
    file is incomplete, which loading reports as a v510G checkpoint without G_LM."""
    state = dict(state)
    G = state.pop(G_BUFFER, None)
    state.pop(G_STATUS, None)
    if G is not None:
        L, H, dk = config.num_layers, config.num_heads, config.dk
        if tuple(G.shape) != (L, 3, 1, H, dk, dk):
            raise CheckpointError(f"{G_BUFFER} has shape {list(G.shape)} but the config needs "
                                  f"{[L, 3, 1, H, dk, dk]}; is the config right?")
        for i in range(L):
            state[_G_key(i)] = G[i, 2, 0].clone()
    return state


def state_to_port(state: Mapping[str, Tensor], config: PLDRConfig) -> dict[str, Tensor]:
    """Our state dict in the port's layout (the inverse of `state_from_port`)."""
    state = dict(state)
    if config.variant == "v510G":
        G = torch.stack([state.pop(_G_key(i)) for i in range(config.num_layers)])  # [L, H, dk, dk]
        buf = G.new_zeros(G.shape[0], 3, 1, *G.shape[1:])                        # [L, 3, 1, H, dk, dk]
        buf[:, 2, 0] = G
        state[G_BUFFER] = buf
        state[G_STATUS] = torch.ones(config.num_layers, dtype=torch.bool)
    return state


# ----- directories ----------------------------------------------------------------------------

def read_port_config(directory: Path) -> dict[str, Any] | None:
    """The parsed config.json of `directory` if it is a port directory, else None."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if is_port_config(d) else None


def read_port_weights(directory: Path) -> dict[str, Tensor]:
    """The port directory's tensors: `model.safetensors`, or the shards named by
    `model.safetensors.index.json`."""
    from ..model.pretrained import read_safetensors

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file() or not index.is_file():
        return read_safetensors(single)
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"cannot read {str(index)!r}: {e}") from None
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(read_safetensors(directory / shard))
    return state


def write_port_files(model: Any, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors of the port, into an
    existing (temporary) directory."""
    from ..files import save_safetensors
    from ..model.pretrained import _plain_tensors

    config = model.config
    head = getattr(model, "port_architecture", None)  # a task head (model/heads.py)
    port = config_to_port(config, model.dtype, head or PORT_ARCHITECTURE)
    (directory / "config.json").write_text(json.dumps(port, indent=2, sort_keys=True) + "\n")
    if head is None:  # the port saves a generation config with its causal LM only
        generation = {"bos_token_id": 2, "eos_token_id": config.eos_id,
                      "pad_token_id": config.pad_id, "use_cache": True}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    state = state_to_port(_plain_tensors(model.state_dict()), config)
    save_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})


def write_port_tokenizer_config(config: PLDRConfig, directory: Path) -> None:
    """tokenizer_config.json beside a port directory's tokenizer.model: it names the
    tokenizer class (PLDRTokenizer, registered by `import pldr.hf`), so
    `AutoTokenizer.from_pretrained(dir)` loads it as it loads our own directories (whose
    model_type pldr_llm names it), with the paper's special pieces."""
    d = {"tokenizer_class": TOKENIZER_CLASS, "pad_token": "[PAD]", "unk_token": "[UNK]",
         "bos_token": "[START]", "eos_token": "[END]", "padding_side": "left",
         "model_max_length": config.max_seq_len}
    (directory / PORT_TOKENIZER_CONFIG).write_text(json.dumps(d, indent=2) + "\n")
