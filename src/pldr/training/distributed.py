"""Multi-process training: the process group, FSDP2 sharding and Distributed Checkpoint.

Run under `torchrun`, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:

    torchrun --nproc_per_node=2 -m pldr train ...

- `init_distributed` starts the process group from those variables (gloo on CPU, nccl on
  CUDA); without them, or with WORLD_SIZE=1, it does nothing and training is single-process.
- `shard_model` applies FSDP2 `fully_shard` to each decoder layer and then to the whole model
  (embedding, input LayerNorm and output head form the root group), with a bf16
  `MixedPrecisionPolicy` (bfloat16 parameters, float32 reductions) for `--precision
  bf16-mixed`.
- `save_sharded` / `load_sharded` write and read the model and optimizer state with
  Distributed Checkpoint (each rank writes its own shards; loading reshards to any number of
  ranks, also to one process without a process group). checkpointing.py decides what goes
  into a checkpoint; this module only moves the tensors.

The model itself stays a single-device module; everything parallel lives here.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..devices import resolve_device
from ..errors import CheckpointError, PLDRError

DCP_METADATA = ".metadata"  # the file that marks a Distributed Checkpoint folder


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one rank is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, the final model and renames checkpoints."""
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun); read before anything starts, so
    a batch size that does not divide is reported before any work."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise PLDRError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_distributed(device: str | torch.device | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group from torchrun's environment (gloo on CPU, nccl on CUDA).

    Without torchrun, or with one process, no group is started and a single-process DistInfo
    is returned. Calling it again once a group runs returns the running group's info."""
    world_size = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


# what gloo and NCCL say when another rank died, closed its connection or stopped answering
_PEER_FAILURE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                 "Timed out", "timed out", "Timeout", "NCCL communicator was aborted",
                 "ProcessGroupGloo", "ProcessGroupNCCL")


def peer_failure(e: BaseException) -> str | None:
    """The first line of `e` when it is a collective that failed because another process of
    the group died or hung (gloo/NCCL errors, a process-group timeout), else None."""
    if not (isinstance(e, getattr(dist, "DistError", ())) or (
            isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_FAILURE))):
        return None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", text)  # gloo's source location
    return " ".join(text.split(". ")[0].split())[:200]


def destroy_distributed(synchronize: bool = True) -> None:
    """End the process group if one runs (safe to call always).

    After a run that ended normally every rank first meets at a barrier, so no rank tears
    its group down while another is still inside a collective (with gloo that ended in a
    SIGABRT at exit now and then). After an error no barrier: another rank may never come."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum `t` over ranks in place (a no-op on one process); returns `t`."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (a picklable object, e.g. tokenizer bytes)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----- FSDP2 ---------------------------------------------------------------------------------


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply FSDP2 `fully_shard` per decoder layer, then to the whole model.

    `param_dtype=torch.bfloat16` gathers parameters in bf16 for the forward/backward and
    reduces gradients in fp32, keeping fp32 master weights (the original's FSDP mixed
    precision). Sharding is in place; the model is returned for convenience."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype is not None else MixedPrecisionPolicy()
    # FSDP2 warns that the root returns views (the logits); nothing here changes them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    layers = model.decoder.dec_layers
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed right away by the backward: keep them
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn FSDP's gradient reduce-scatter off for all but the last micro-batch of a step
    (gradient accumulation); a no-op for an unsharded model."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


# ----- state dicts -----------------------------------------------------------------------------


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, Tensor]:
    """The unsharded model state dict on CPU: complete on rank 0, empty on the other ranks.

    All ranks must call it (it gathers the shards)."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the model and optimizer state as a Distributed Checkpoint into `directory`
    (every rank writes its shards; all ranks must call it with the same directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 directory: Path) -> None:
    """Read a Distributed Checkpoint written by `save_sharded` into the model (and optimizer),
    resharding to however many ranks run now (also one, without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    check_dcp_dir(directory)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(directory))
        set_model_state_dict(model, state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


@contextmanager
def _quiet_single_process():
    """Hide DCP's warning that it runs without a process group: writing or reading a
    checkpoint on one process (a 1-process run, a conversion) is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def check_dcp_dir(directory: str | os.PathLike) -> Path:
    """`directory` as a Path, or a clear error when it holds no Distributed Checkpoint."""
    directory = Path(directory)
    if not (directory / DCP_METADATA).is_file():
        raise CheckpointError(f"{str(directory)!r} is not a Distributed Checkpoint (it has no "
                              f"{DCP_METADATA} file); pass a checkpoint folder of a `pldr train` "
                              "run, e.g. RUN/checkpoints/step-00001000")
    return directory


__all__ = ["DistInfo", "init_distributed", "destroy_distributed", "resolve_device",
           "env_world_size", "shard_model", "set_gradient_sync", "full_model_state",
           "save_sharded", "load_sharded",
           "check_dcp_dir", "all_reduce_sum", "broadcast_object", "barrier", "peer_failure"]
