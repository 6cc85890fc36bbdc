"""Hugging Face transformers classes that wrap `PLDRModel` (no second implementation).

`import pldr.hf` registers model type `pldr_llm` with `AutoConfig`, `AutoModelForCausalLM` and
`AutoTokenizer`, so a pldr model directory (config.json with model_type "pldr_llm" +
model.safetensors [+ tokenizer.model]) loads with `AutoModelForCausalLM.from_pretrained(dir)`
and `pipeline("text-generation", model=dir)`, and what transformers saves loads with
`pldr.load_model(dir)`: the wrapper's parameters are the wrapped model's own `decoder` and
`final_layer`, so both APIs read and write the same keys.

- `PLDRHFConfig`: a `PreTrainedConfig` whose fields are `PLDRConfig`'s.
- `PLDRForCausalLM`: forward(input_ids, attention_mask, past_key_values / cache, use_cache,
  labels, output_deductive) over our model. Left padding follows transformers: positions
  where `attention_mask` is 0 are pads (they are set to the pad id, which is how our model
  knows pads: never in A, never attended to, not counted in positions).
- `PLDRCache`: a transformers `Cache` backed by our KV-cache and G-cache, so `generate`
  with `use_cache=True` decodes like `pldr.generate(cache="kv_g")`; `use_cache=False`
  recomputes everything each step like `cache="no_cache"`.
- `PLDRTokenizer`: the paper's SentencePiece tokenizer (`tokenizer.model`) with its
  conventions: no BOS, and no EOS added when encoding (prompts); [PAD]=0, [UNK]=1,
  [START]=2, [END]=3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from ..config import PLDRConfig
from ..model.cache import InferenceCache
from ..model.model import PLDRModel

MODEL_TYPE = "pldr_llm"
_TINY = PLDRConfig.preset("tiny")


@strict
class PLDRHFConfig(PreTrainedConfig):
    """`PLDRConfig` as a transformers config (same field names, so our config.json reads)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    num_layers: int = _TINY.num_layers
    d_model: int = _TINY.d_model
    num_heads: int = _TINY.num_heads
    dff: int = _TINY.dff
    num_reslayerA: int = _TINY.num_reslayerA
    num_denseA: int = _TINY.num_denseA
    A_dff: int = _TINY.A_dff
    vocab_size: int = _TINY.vocab_size
    max_seq_len: int = _TINY.max_seq_len
    variant: str = "v510"
    rope_base: float = 10000.0
    layernorm_eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 3
    metric_includes_pad: bool = False
    rope_style: str = "interleaved"
    # num_labels, id2label and problem_type are PreTrainedConfig's own (same defaults)
    classifier_dropout: float = 0.1
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.pad_token_id = self.pad_id if self.pad_token_id is None else self.pad_token_id
        self.eos_token_id = self.eos_id if self.eos_token_id is None else self.eos_token_id
        super().__post_init__(**kwargs)
        self.to_pldr()  # validate now: a bad field is a ConfigError naming it

    @classmethod
    def from_pldr(cls, config: PLDRConfig, **kwargs: Any) -> "PLDRHFConfig":
        return cls(**dataclasses.asdict(config), **kwargs)

    def to_pldr(self) -> PLDRConfig:
        names = [f.name for f in dataclasses.fields(PLDRConfig)]
        return PLDRConfig(**{n: getattr(self, n) for n in names})


class PLDRCache(Cache):
    """Our inference cache (KV + G, mode kv_g) behind transformers' Cache interface (one per
    generate call).

    Allocated for the whole context (`max_seq_len`) at the first forward that needs it; the
    first call fixes A and G_LM from the prompt, later calls append keys and values."""

    is_compileable = False
    is_croppable = False

    def __init__(self, inner: InferenceCache):
        super().__init__(layers=[])
        self.inner = inner

    @classmethod
    def allocate(cls, config: PLDRConfig, batch_size: int, device: torch.device,
                 dtype: torch.dtype) -> "PLDRCache":
        return cls(InferenceCache.for_mode(config, "kv_g", batch_size, config.max_seq_len,
                                           device, dtype))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.inner.length  # host-side: no device sync

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.inner.max_len

    def __len__(self) -> int:
        return self.inner.config.num_layers


@dataclass
class PLDRCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus our deductive outputs (`output_deductive=True`)."""

    deductive: Any = None


class PLDRForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM over `PLDRModel`: its `decoder` and `final_layer` are this module's own
    (same state-dict keys as our directories); the forward is PLDRModel's."""

    config_class = PLDRHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: PLDRHFConfig):
        super().__init__(config)
        inner = PLDRModel(config.to_pldr())
        self.decoder, self.final_layer = inner.decoder, inner.final_layer
        object.__setattr__(self, "pldr_model", inner)  # shares those modules; not a second copy
        self.post_init()

    @classmethod
    def from_pldr(cls, model: PLDRModel) -> "PLDRForCausalLM":
        """Wrap an existing PLDRModel (its weights are shared, not copied)."""
        with torch.device("meta"):
            hf = cls(PLDRHFConfig.from_pldr(model.config))
        hf.decoder, hf.final_layer = model.decoder, model.final_layer
        object.__setattr__(hf, "pldr_model", model)
        return hf.train(model.training)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """PLDRModel initialises itself at construction (as the original intends)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (PLDRCache)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.embedding

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.final_layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: PLDRCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, output_deductive: bool = False,
                cache: PLDRCache | None = None, **kwargs: Any) -> PLDRCausalLMOutput:
        """Logits for input_ids [B, T]; with a cache (transformers 5 passes it as `cache=` or
        `past_key_values=`) a cached step. `position_ids` are not needed: our model counts
        positions from each row's first real token, which is what transformers derives from
        the attention mask."""
        cache = past_key_values if past_key_values is not None else cache
        # a plain call (use_cache not given) runs uncached, as `PLDRModel` does: the same
        # kernels, so the same logits; `generate` passes use_cache from its config
        use_cache = bool(use_cache) or cache is not None
        ids = input_ids
        mask = None if attention_mask is None else attention_mask[:, -ids.shape[1]:].to(ids.device)
        if use_cache and cache is None:
            cache = PLDRCache.allocate(self.pldr_model.config, ids.shape[0], ids.device,
                                       self.final_layer.weight.dtype)
        out = self.pldr_model(ids, attention_mask=mask, cache=None if cache is None else cache.inner,
                              return_deductive=output_deductive, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(out.logits.device),
                                   ignore_index=-100)
        return PLDRCausalLMOutput(loss=loss, logits=out.logits,
                                  past_key_values=cache if use_cache else None,
                                  hidden_states=None, deductive=out.deductive)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: PLDRCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """Feed only what the cache has not seen; the mask always covers the whole sequence."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "past_key_values": past_key_values, "use_cache": use_cache}
        for key in ("output_deductive", "logits_to_keep"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs


class PLDRTokenizer(SentencePieceBackend):
    """The paper's SentencePiece tokenizer (`tokenizer.model`) for transformers: [PAD]=0,
    [UNK]=1, [START]=2 (never added), [END]=3 (not added when encoding: prompts carry no EOS;
    training text gets it from `pldr.Tokenizer.encode`)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, add_eos_token: bool | None = None, **kwargs: Any):
        # classification heads learn from texts that end with [END] (pldr finetune, and the
        # published FT-SC/FT-TC): the tokenizer of such a model's directory appends it
        self.add_eos_token = (_classifier_directory(vocab_file) if add_eos_token is None
                              else bool(add_eos_token))
        kwargs.setdefault("pad_token", "[PAD]")
        kwargs.setdefault("unk_token", "[UNK]")
        kwargs.setdefault("bos_token", "[START]")
        kwargs.setdefault("eos_token", "[END]")
        kwargs.setdefault("padding_side", "left")  # generation pads on the left
        kwargs["legacy"] = True  # plain SentencePiece encoding, as pldr.Tokenizer
        super().__init__(vocab_file=vocab_file, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        eos = [self.eos_token_id] if self.add_eos_token else []
        return token_ids_0 + eos + ((token_ids_1 + eos) if token_ids_1 else [])

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 where build_inputs_with_special_tokens added [END] (pipelines skip those)."""
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        eos = [1] if self.add_eos_token else []
        mask = [0] * len(token_ids_0) + eos
        return mask + (([0] * len(token_ids_1) + eos) if token_ids_1 else [])

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                **kwargs: Any) -> str:
        """SentencePiece's own decoding (byte-fallback pieces become their characters)."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp_model.decode(ids)


def _classifier_directory(vocab_file: str) -> bool:
    """Whether the tokenizer sits beside a classification head's config.json."""
    import json
    from pathlib import Path

    from ..model.heads import PLDRForQuestionAnswering, head_class

    try:
        d = json.loads((Path(vocab_file).parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return False
    head = head_class(d.get("architectures")) if isinstance(d, dict) else None
    return head is not None and head is not PLDRForQuestionAnswering


def register() -> None:
    """Register `pldr_llm` with AutoConfig, AutoModelForCausalLM and AutoTokenizer (idempotent)."""
    AutoConfig.register(MODEL_TYPE, PLDRHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(PLDRHFConfig, PLDRForCausalLM, exist_ok=True)
    AutoTokenizer.register(PLDRHFConfig, tokenizer_class=PLDRTokenizer, exist_ok=True)


register()

__all__ = ["PLDRHFConfig", "PLDRForCausalLM", "PLDRCache", "PLDRCausalLMOutput",
           "PLDRTokenizer", "register", "MODEL_TYPE"]
