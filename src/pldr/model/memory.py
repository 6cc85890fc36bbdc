"""Memory estimates made before anything is allocated, so a configuration that cannot fit
is one error naming the estimate, what the device has and the setting to change, instead
of an allocation failure deep in torch (or the machine swapping to a halt).

    need = training_memory(config, parameter_count(config), rows=16, seq_len=1024)
    check_fits(need, device, "lower `batch_size` or `context_length`", "training")

Parameters are counted exactly (`model.parameter_count` builds the model on the meta
device: no memory, no init); the inference cache exactly as `InferenceCache` allocates
it; training activations are a rough upper bound (per token and layer a few d_model-wide
tensors, the FFN, the attention scores, and the logits with their softmax and gradient;
1.2-1.5x the measured peak on pldr-110m layers). Set PLDR_NO_MEMORY_CHECK=1 to skip the
check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import PLDRConfig
from ..devices import available_memory
from ..errors import ConfigError

GiB = float(1 << 30)
SKIP_ENV = "PLDR_NO_MEMORY_CHECK"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part (named, e.g. parameters, AdamW state, activations); `total` is the sum."""

    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def scaled(self, k: int) -> "MemoryEstimate":
        """`k` processes' worth (ranks that share one machine's RAM)."""
        if k <= 1:
            return self
        return MemoryEstimate(tuple((f"{name} x{k}", n * k) for name, n in self.parts))

    def describe(self) -> str:
        """'41.2 GiB (parameters 10.3 GiB, gradients 10.3 GiB, ...)'."""
        inner = ", ".join(f"{name} {_gib(n)}" for name, n in self.parts if n)
        return f"{_gib(self.total)} ({inner})"


def _gib(n: int) -> str:
    """4.2 GiB, 27,500 GiB, 12.5 MiB."""
    if n < GiB / 100:
        return f"{n / (1 << 20):.3g} MiB"
    return f"{n / GiB:.3g} GiB" if n < 100 * GiB else f"{n / GiB:,.0f} GiB"


def training_memory(config: PLDRConfig, parameters: int, rows: int, seq_len: int, *,
                    shards: int = 1, autocast_bytes: int = 4) -> MemoryEstimate:
    """One training process of a model of `parameters` elements (`model.parameter_count`):
    fp32 weights, gradients and AdamW's two moments (each a 1/`shards` part under FSDP), and
    the activations a step keeps for the backward of `rows` rows of `seq_len` tokens
    (elements of `autocast_bytes`; the logits in fp32)."""
    n = parameters
    d, dff, L, H, V = config.d_model, config.dff, config.num_layers, config.num_heads, \
        config.vocab_size
    dk, A_dff = config.dk, max(config.A_dff, 1)
    # per token and layer: a few [d] tensors, the SwiGLU FFN [3 dff], the scores [2 H T]
    per_token = L * (16 * d + 3 * dff + 2 * H * seq_len)
    # per row and layer: the metric learner's GLUs [H, dk, A_dff] and the [H, dk, dk] tensors
    per_row = L * (config.num_reslayerA * (3 * config.num_denseA * H * dk * A_dff
                                           + 2 * H * dk * dk) + 8 * H * dk * dk)
    tokens = rows * seq_len
    activations = (tokens * per_token + rows * per_row) * autocast_bytes + tokens * V * 3 * 4
    weights = 4 * n // shards
    return MemoryEstimate((("parameters", weights), ("gradients", weights),
                           ("AdamW state", 2 * weights), ("activations (rough)", activations)))


def cache_memory(config: PLDRConfig, slots: int, max_len: int, kv: bool,
                 dtype: torch.dtype) -> MemoryEstimate:
    """What `InferenceCache` allocates: keys and values (kv modes) and the per-slot dk x dk
    tensors (A with kv, and G_LM, A_LM, A_G, A_P)."""
    L, H, dk = config.num_layers, config.num_heads, config.dk
    size = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * L * slots * H * max_len * dk * size if kv else 0
    square = (5 if kv else 4) * L * slots * H * dk * dk * size
    return MemoryEstimate((("keys and values", kv_bytes), ("A and G_LM per slot", square)))


def check_fits(need: MemoryEstimate, device: torch.device, knob: str, what: str,
               available: tuple[int, str] | None = None) -> None:
    """Raise a ConfigError when `need` exceeds the memory `device` has left (`available`,
    default: `devices.available_memory`), naming both figures and `knob`, the setting to
    change (naming parameters in backticks, as errors.py says). Unknown availability, or
    PLDR_NO_MEMORY_CHECK=1, lets it pass."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    available = available if available is not None else available_memory(device)
    if available is None or need.total <= available[0]:
        return
    free, where = available
    raise ConfigError(f"{what} needs about {need.describe()} but {device} has {_gib(free)} "
                      f"{where}; {knob} (or set {SKIP_ENV}=1 to try anyway)")


__all__ = ["MemoryEstimate", "training_memory", "cache_memory",
           "check_fits", "SKIP_ENV"]
