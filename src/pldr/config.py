"""`PLDRConfig`: the model's hyperparameters as a frozen dataclass.

Field names follow the original release's hyperparameter dictionary ("hpdict") where one
exists, so `from_hpdict` / `to_hpdict` convert losslessly. Training settings of the hpdict
(learning rate, FSDP options, ...) are not part of the model and are ignored here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, PLDRTypeError

VARIANTS = ("v510", "v510G")
# RoPE conventions: "interleaved" pairs dims (2i, 2i+1) (the original, PLDR-LLM-v51);
# "half" pairs dims (i, i + dk/2) (rotate-half, GPT-NeoX / transformers' Llama; PLDR-LLM-v52)
ROPE_STYLES = ("interleaved", "half")
# upper bounds far above any PLDR-LLM, so a typo (1e12) is an error, not an allocation failure
SIZE_LIMITS = {"num_layers": 1024, "d_model": 65536, "num_heads": 1024, "dff": 1 << 20,
               "num_reslayerA": 1024, "num_denseA": 1024, "A_dff": 1 << 20,
               "vocab_size": 1 << 24, "max_seq_len": 1 << 20}

# hpdict keys that describe the model (input_vocab_size is our vocab_size).
_HPDICT_MODEL_KEYS = ("num_layers", "d_model", "num_heads", "dff", "num_reslayerA",
                      "num_denseA", "A_dff", "input_vocab_size", "max_seq_len")
# hpdict keys of the original that configure training, not the model: accepted and ignored.
_HPDICT_TRAINING_KEYS = frozenset({
    "activation", "epochs", "save_model_path", "warmup_steps", "lr_total_steps",
    "learning_rate", "lr_alpha", "adamw_decay", "device", "auto_size_minimum", "disable_amp",
    "disable_fsdp_mixed_precision", "fsdp_cpu_offload", "fsdp_sharding_strategy",
    "backward_prefetch", "save_type", "DAG_reg_coeffs",
    # written by the fixture generator / other tools alongside the hpdict
    "dk", "model_version", "rope_convention", "torch_manual_seed_before_construction",
    "input_generator_seed",
})


# keys of a config.json that are not PLDRConfig fields: ours, and what transformers adds when
# it saves a model (`pldr.hf`)
_NOT_FIELDS = frozenset({
    "model_type", "architectures", "dk", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    "_name_or_path", "label2id",
})
# the task-head fields (model/heads.py): written to config.json only when one differs from its
# default, so a causal model's config is what it always was
HEAD_FIELDS = ("num_labels", "id2label", "problem_type", "classifier_dropout")
PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification", "regression")


@dataclass(frozen=True)
class PLDRConfig:
    """Hyperparameters of a PLDR-LLM (docs/model.md says what each one does)."""

    num_layers: int
    d_model: int
    num_heads: int
    dff: int
    num_reslayerA: int
    num_denseA: int
    A_dff: int
    vocab_size: int
    max_seq_len: int
    variant: str = "v510"
    rope_base: float = 10000.0
    layernorm_eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 3
    metric_includes_pad: bool = False
    rope_style: str = "interleaved"
    # task heads (pldr.PLDRForSequenceClassification, ...; ignored by the causal model), as in
    # transformers: id2label maps 0..num_labels-1 to names (LABEL_i when not given);
    # problem_type None lets the sequence classifier choose from num_labels and the labels'
    # dtype; classifier_dropout is the token classifier's dropout before its linear layer.
    # num_labels None: id2label's length, or 2 without id2label (transformers' default)
    num_labels: int | None = None
    id2label: dict[int, str] | None = field(default=None, hash=False)
    problem_type: str | None = None
    classifier_dropout: float = 0.1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int",) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"config field {f.name!r} must be an integer, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"config field {f.name!r} must be a number, got {value!r}")
            if f.type == "str" and not isinstance(value, str):
                raise ConfigError(f"config field {f.name!r} must be a string, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"config field {f.name!r} must be true or false, got {value!r}")
        positive = ("num_layers", "d_model", "num_heads", "dff", "vocab_size", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {getattr(self, name)}")
        for name, limit in SIZE_LIMITS.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"config field {name!r} is {getattr(self, name)}, beyond any "
                                  f"sane model (at most {limit}); check the config")
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ConfigError(f"config field 'rope_base' must be a finite number > 1 (the "
                              f"original uses 10000), got {self.rope_base!r}")
        if not (math.isfinite(self.layernorm_eps) and 0 < self.layernorm_eps < 1):
            raise ConfigError(f"config field 'layernorm_eps' must lie in (0, 1) (the original "
                              f"uses 1e-6), got {self.layernorm_eps!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"config field 'variant' must be one of {VARIANTS}, got {self.variant!r}")
        if self.rope_style not in ROPE_STYLES:
            raise ConfigError(f"config field 'rope_style' must be one of {ROPE_STYLES}, got "
                              f"{self.rope_style!r}")
        if self.variant == "v510":
            for name in ("num_reslayerA", "num_denseA", "A_dff"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"config field {name!r} must be > 0 for variant v510, "
                                      f"got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by num_heads "
                              f"({self.num_heads})")
        if self.dk % 2:
            raise ConfigError(f"the head size d_model/num_heads = {self.dk} must be even for "
                              "rotary position embedding")
        for name in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) must lie in "
                                  f"[0, vocab_size={self.vocab_size})")
        self._check_head_fields()

    def _check_head_fields(self) -> None:
        """num_labels >= 1; id2label normalised to {0: name, ..., n-1: name} (JSON's string
        keys accepted); a known problem_type; a dropout probability in [0, 1)."""
        if self.num_labels is None:
            object.__setattr__(self, "num_labels", 2 if self.id2label is None else len(self.id2label))
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) \
                or self.num_labels < 1:
            raise ConfigError(f"config field 'num_labels' must be an integer >= 1, got "
                              f"{self.num_labels!r}")
        names = self.id2label
        if names is None:
            names = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if not isinstance(names, Mapping):
            raise ConfigError(f"config field 'id2label' must map label ids to names, got "
                              f"{type(names).__name__}")
        try:
            names = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise ConfigError("config field 'id2label' must have integer ids as keys, got "
                              f"{sorted(map(str, names))}") from None
        if sorted(names) != list(range(self.num_labels)):
            raise ConfigError(f"id2label has ids {sorted(names)} but num_labels is "
                              f"{self.num_labels}; give one name for each id 0..num_labels-1")
        if not all(isinstance(v, str) and v for v in names.values()):
            raise ConfigError("config field 'id2label' must map each id to a non-empty name")
        if len(set(names.values())) != len(names):
            raise ConfigError("config field 'id2label' names a label twice; label names must "
                              "be distinct (label2id is its inverse)")
        object.__setattr__(self, "id2label", dict(sorted(names.items())))
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"config field 'problem_type' must be one of {PROBLEM_TYPES}, got "
                              f"{self.problem_type!r}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ConfigError("problem_type 'single_label_classification' needs num_labels >= 2 "
                              "(use 'regression' for one output)")
        if not 0 <= self.classifier_dropout < 1:
            raise ConfigError(f"config field 'classifier_dropout' must lie in [0, 1), got "
                              f"{self.classifier_dropout!r}")

    @property
    def label2id(self) -> dict[str, int]:
        """The inverse of id2label: label name -> id."""
        return {name: i for i, name in self.id2label.items()}

    @property
    def dk(self) -> int:
        """Head size (the original's `depth`): d_model / num_heads."""
        return self.d_model // self.num_heads

    def replace(self, **changes: Any) -> "PLDRConfig":
        """A copy with some fields changed (the config itself is frozen).

        Labels follow each other as in transformers: a new `id2label` alone sets num_labels
        to its length; a new `num_labels` alone renames the labels LABEL_0.. (when the
        current names do not fit it)."""
        if "id2label" in changes and "num_labels" not in changes and changes["id2label"] is not None:
            changes["num_labels"] = len(changes["id2label"])
        elif ("num_labels" in changes and "id2label" not in changes
              and changes["num_labels"] != self.num_labels):
            changes["id2label"] = None
        return dataclasses.replace(self, **changes)

    # ----- presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "PLDRConfig":
        """A named configuration: `tiny` (demo), `pldr-110m` (paper), `pldr-110m-G` (its v510G twin)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def resolve(cls, spec: Any, name: str = "config") -> "PLDRConfig":
        """The config that `spec` names, whatever form it takes: a PLDRConfig (as it is), a
        preset name, a dict (our config or an original hpdict), or the path of a config.json
        / hpdict JSON file or of a model folder holding a config.json.

        One resolver for every place that takes a model config (training, loading,
        benchmarks); `name` is what error messages call the argument, e.g. "--model"."""
        if isinstance(spec, PLDRConfig):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(dict(spec))
        if isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
            return cls.from_json(spec)  # an existing path wins over a preset of its name
        if isinstance(spec, str) and spec in PRESETS:
            return PRESETS[spec]
        if isinstance(spec, (str, os.PathLike)):
            if not Path(spec).exists():
                raise ConfigError(f"{name} {os.fspath(spec)!r} is neither a preset "
                                  f"({', '.join(PRESETS)}) nor an existing config.json / hpdict "
                                  "file or model folder")
            return cls.from_json(spec)
        raise PLDRTypeError(f"{name} must be a PLDRConfig, a preset name, an hpdict / config "
                            f"dict or a JSON path, got {type(spec).__name__}")

    # ----- hpdict ------------------------------------------------------------------------
    @classmethod
    def from_hpdict(cls, hpdict: dict[str, Any], **overrides: Any) -> "PLDRConfig":
        """Build a config from the original release's hyperparameter dictionary.

        `input_vocab_size` becomes `vocab_size`; training keys are ignored; a key that is
        neither is an error (it is most likely a typo)."""
        if not isinstance(hpdict, dict):
            raise ConfigError(f"an hpdict must be a dict, got {type(hpdict).__name__}")
        missing = [k for k in _HPDICT_MODEL_KEYS if k not in hpdict]
        if missing:
            raise ConfigError(f"hpdict is missing the model key(s) {', '.join(missing)}; "
                              "add them (the original's hpdict has them all)")
        ours = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hpdict if k not in _HPDICT_MODEL_KEYS
                         and k not in _HPDICT_TRAINING_KEYS and k not in ours)
        if unknown:
            raise ConfigError(f"hpdict has unknown key(s) {', '.join(unknown)}; remove them "
                              "or fix their spelling")
        kwargs = {k: hpdict[k] for k in _HPDICT_MODEL_KEYS if k != "input_vocab_size"}
        kwargs["vocab_size"] = hpdict["input_vocab_size"]
        for k in ours - set(kwargs):
            if k in hpdict:
                kwargs[k] = hpdict[k]
        if "rope_base" in kwargs and isinstance(kwargs["rope_base"], int):
            kwargs["rope_base"] = float(kwargs["rope_base"])
        kwargs.update(overrides)
        config = cls(**kwargs)
        if "dk" in hpdict and hpdict["dk"] != config.dk:
            raise ConfigError(f"hpdict dk={hpdict['dk']} does not equal d_model/num_heads="
                              f"{config.dk}; fix dk or d_model")
        return config

    def to_hpdict(self) -> dict[str, Any]:
        """The original's model keys (plus `activation`), e.g. to build the original model;
        `rope_style` too when it is not the original's interleaved one."""
        d = {k: getattr(self, k) for k in _HPDICT_MODEL_KEYS if k != "input_vocab_size"}
        d["input_vocab_size"] = self.vocab_size
        d["activation"] = "silu"
        d = {k: d[k] for k in (*_HPDICT_MODEL_KEYS, "activation")}
        if self.rope_style != "interleaved":
            # not a key of the original (interleaved only): written so that the hpdict round
            # trip keeps it; `pldr convert --to original` permutes such a model instead
            d["rope_style"] = self.rope_style
        return d

    # ----- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, plus `model_type` so a Hugging Face adapter recognises the file. The
        head fields (with `label2id`, as transformers writes it) only when one of them
        differs from its default."""
        d = {"model_type": "pldr_llm", **dataclasses.asdict(self)}
        if not self.has_head_fields():
            return {k: v for k, v in d.items() if k not in HEAD_FIELDS}
        d["id2label"] = {str(i): name for i, name in self.id2label.items()}
        d["label2id"] = self.label2id
        return d

    def has_head_fields(self) -> bool:
        """Whether a head field differs from its default (num_labels 2 named LABEL_0/1, no
        problem_type, dropout 0.1)."""
        default = PLDRConfig.__dataclass_fields__
        return (self.num_labels != 2
                or self.id2label != {i: f"LABEL_{i}" for i in range(self.num_labels)}
                or self.problem_type is not None
                or self.classifier_dropout != default["classifier_dropout"].default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PLDRConfig":
        """Read `to_dict` output, or an original hpdict (recognised by `input_vocab_size`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        if "input_vocab_size" in d:
            return cls.from_hpdict(d)
        d = {k: v for k, v in d.items() if k not in _NOT_FIELDS}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config has unknown key(s) {', '.join(unknown)}; remove them "
                              "or fix their spelling")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in d]
        if required:
            raise ConfigError(f"config is missing the key(s) {', '.join(required)}")
        if isinstance(d.get("rope_base"), int) and not isinstance(d.get("rope_base"), bool):
            d["rope_base"] = float(d["rope_base"])
        for name in ("layernorm_eps", "classifier_dropout"):
            if isinstance(d.get(name), int) and not isinstance(d.get(name), bool):
                d[name] = float(d[name])
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "PLDRConfig":
        """Read a config written by `to_json`, or an original hpdict saved as JSON."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not a text file; pass the "
                              "hpdict or config.json (JSON), not a checkpoint") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def to_json(self, path: str | Path) -> None:
        """Write the config (with `model_type: "pldr_llm"`) as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def num_parameters(self) -> int:
        """Parameter count of a model built from this config (without building it)."""
        D, H, dk, V, L = self.d_model, self.num_heads, self.dk, self.vocab_size, self.num_layers
        glu = lambda i, h, o: 2 * (i * h + h) + h * o + o  # noqa: E731
        per_layer = 4 * (D * D + D) + glu(D, self.dff, D) + 4 * D
        if self.variant == "v510":
            per_layer += 5 * H * dk * dk + 2 * dk  # power-law params + metric LayerNorm
            per_layer += self.num_reslayerA * (self.num_denseA * glu(dk, self.A_dff, dk) + 2 * dk)
        return V * D + 2 * D + L * per_layer + D * V + V


def _paper_dff(d_model: int) -> int:
    """The original's feed-forward width: floor(d_model * 4 * 2 / 3)."""
    return int(math.floor(d_model * 4 * 2 / 3))


PRESETS: dict[str, PLDRConfig] = {
    # Small enough to train on the built-in corpus in a few minutes on 2 CPU cores.
    "tiny": PLDRConfig(num_layers=2, d_model=128, num_heads=4, dff=_paper_dff(128),
                       num_reslayerA=2, num_denseA=2, A_dff=64, vocab_size=2048,
                       max_seq_len=256),
    # The paper's 110M model (arXiv 2502.13502) and its v510G ablation twin.
    "pldr-110m": PLDRConfig(num_layers=5, d_model=896, num_heads=14, dff=_paper_dff(896),
                            num_reslayerA=8, num_denseA=2, A_dff=170, vocab_size=32000,
                            max_seq_len=1024),
}
PRESETS["pldr-110m-G"] = PRESETS["pldr-110m"].replace(variant="v510G")
