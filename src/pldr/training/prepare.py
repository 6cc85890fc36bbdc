"""Preparing a training run: every input is checked and loaded before anything is written,
then the run folder is made and the model and optimizer are built.

`prepare_run(cfg)` returns a `PreparedRun`: the model config (vocabulary from the tokenizer),
the tokenizer (given, the resumed run's, or trained on rank 0 and sent to the others), the
loaders and the step counts. `make_run_folder` writes OUT/tokenizer.model and
OUT/train_config.json; `build_model` / `build_optimizer` make what the loop trains.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PLDRConfig
from ..errors import CheckpointError, ConfigError, DataError, import_extra
from ..model.model import PLDRModel, parameter_count
from ..model.pretrained import CONFIG_FILE, TOKENIZER_FILE
from . import distributed as ptd
from .checkpointing import (
    CHECKPOINTS,
    FINAL,
    find_resume_checkpoint,
    later_checkpoints,
    list_checkpoints,
    read_trainer_state,
    remove_partial_saves,
    verify_checkpoint,
    write_json,
)
from .config import TrainConfig
from .metrics import METRICS_FILE, TENSORBOARD_DIR, copy_history
from .step import make_optimizer

log = logging.getLogger("pldr")

TRAIN_CONFIG_FILE = "train_config.json"
# --precision -> the forward's autocast dtype and the dtype of weights, gradients and AdamW
AUTOCAST = {"fp32": None, "bf16-mixed": torch.bfloat16, "bf16-true": None}
WEIGHTS = {"fp32": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}
# every entry a run writes into OUT (what `pldr demo` may remove again)
RUN_ENTRIES = (TOKENIZER_FILE, TRAIN_CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, CHECKPOINTS,
               FINAL)


@dataclass
class PreparedRun:
    """A checked, loaded training run, before anything is written."""

    cfg: TrainConfig
    dist: ptd.DistInfo
    out: Path
    config: PLDRConfig            # the model's, with the tokenizer's vocabulary
    tokenizer: Any
    context_length: int
    train_loader: Any             # TokenBatches: this rank's rows of each global batch
    val_loader: Any               # TokenBatches or None
    total_steps: int
    lr_total_steps: int
    micro_batch_size: int         # rows per forward on this process
    amp_dtype: torch.dtype | None  # the forward's autocast dtype (bf16-mixed), else None
    tensorboard: bool
    progress: bool
    resume_dir: Path | None
    fork_of: Path | None = None   # with --fork-to: the run folder whose history is copied
    # whether the batches may hold pad ids: a packed stream never does, so its forward reads
    # no value back (PLDRModel.forward's `pads`)
    pads: bool = True


def prepare_run(cfg: TrainConfig) -> PreparedRun:
    """Check `cfg` against the model, the data and the number of processes, start the
    process group, get the tokenizer and build the loaders; raises a PLDRError naming the
    flag to change before any work or write."""
    cfg.check()
    out = Path(cfg.out)
    world_size = ptd.env_world_size()
    if cfg.batch_size % world_size:
        raise ConfigError(f"`batch_size={cfg.batch_size}` (the global batch) must be "
                          f"divisible by the number of processes, {world_size}")
    local_rows = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or local_rows
    if local_rows % micro:
        raise ConfigError(f"`micro_batch_size={micro}` must divide the rows of each process, "
                          f"batch_size / processes = {local_rows}")
    resume_dir = find_resume_checkpoint(cfg.resume, out)
    fork_of = None
    if cfg.fork_to is not None:
        cfg, out, fork_of = _fork(cfg, resume_dir)
    if resume_dir is not None:
        # a checkpoint this version resumes, every file as saved (sha256), before any is read
        step = int(verify_checkpoint(resume_dir)["step"])
        later = later_checkpoints(out, step)
        if later and not cfg.truncate_later_steps:
            raise CheckpointError(
                f"`out={str(out)!r}` already went on past step {step} (up to "
                f"{later[-1].name}); resuming {str(resume_dir)!r} there would overwrite that "
                "branch: give `fork_to=NEW_DIR` to branch into a new run folder, or "
                "`truncate_later_steps=True` to delete the later checkpoints and final model")
    elif is_run_dir(out):
        raise CheckpointError(f"`out={str(out)!r}` already holds a training run; pass "
                              "`resume='auto'` to continue it, or choose another `out`")
    else:
        _check_leftovers(out, cfg.tokenizer)
    base = PLDRConfig.resolve(cfg.model, "`model`")
    if base.variant != "v510" and any(cfg.dag_coeffs):
        raise ConfigError("`dag_coeffs` regularise A_LM, A_P and G_LM of a v510 model; a "
                          f"{base.variant} model has a fixed G_LM: drop `dag_coeffs`")
    context_length = cfg.context_length or base.max_seq_len
    if context_length > base.max_seq_len:
        raise ConfigError(f"`context_length={context_length}` is longer than the model's "
                          f"max_seq_len {base.max_seq_len}; lower it")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        raise DataError(f"`tokenizer={cfg.tokenizer!r}` does not exist")
    tensorboard = _tensorboard(cfg.tensorboard)
    from ..data.sources import parse_source
    from ..data.splits import default_splits, parse_split

    parse_source(cfg.data)  # a missing file or folder fails here
    train_split, val_split = default_splits(cfg.split, cfg.val_split)
    for s in (train_split, val_split):
        if s is not None:
            parse_split(s)

    dist = ptd.init_distributed(cfg.device, timeout_s=cfg.dist_timeout)
    progress = dist.is_main and (cfg.progress if cfg.progress is not None
                                 else sys.stderr.isatty())
    tokenizer, train_docs = _tokenizer(cfg, base, resume_dir, out, train_split, dist)
    if tokenizer.pad_id != 0:
        raise DataError(f"the tokenizer's pad id is {tokenizer.pad_id}, but the loss ignores "
                        "id 0; use a tokenizer with [PAD] = 0 (as `Tokenizer.train` makes)")
    config = base.replace(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                          eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else base.eos_id)
    if resume_dir is not None and PLDRConfig.from_json(resume_dir / CONFIG_FILE) != config:
        raise CheckpointError(f"the model of checkpoint {str(resume_dir)!r} does not match "
                              "`model` / `tokenizer`; resume with the settings of the run (or "
                              "omit them to reuse its own)")
    _check_memory(config, cfg, micro, context_length, dist)
    train_loader, val_loader = _loaders(cfg, tokenizer, context_length, train_split, val_split,
                                        train_docs, dist, progress)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(f"one epoch has {len(train_loader)} batches, fewer than "
                        f"`grad_accum={cfg.grad_accum}`; use more data or a smaller batch")
    by_epochs = (cfg.epochs or 1) * steps_per_epoch
    if cfg.max_steps is None:
        total = by_epochs
    else:
        total = cfg.max_steps if cfg.epochs is None else min(cfg.max_steps, by_epochs)
    if resume_dir is None:  # a resumed run keeps the schedule it started with
        cfg = fit_warmup(cfg, total, dist.is_main)
    return PreparedRun(cfg=cfg, dist=dist, out=out, config=config, tokenizer=tokenizer,
               context_length=context_length, train_loader=train_loader,
               val_loader=val_loader, total_steps=total,
               lr_total_steps=cfg.lr_total_steps or total, micro_batch_size=micro,
               amp_dtype=AUTOCAST[cfg.precision],
               tensorboard=tensorboard, progress=progress, resume_dir=resume_dir,
               fork_of=fork_of, pads=cfg.chunk_mode != "pack")


def fit_warmup(cfg: TrainConfig, total: int, say: bool = True) -> TrainConfig:
    """`cfg` with a warm-up that ends within the run: one of `total` steps or more (the
    learning rate would never reach its peak) is capped at a tenth of the run, at least 1
    step, with one logged line; train_config.json then records the capped value."""
    if cfg.warmup_steps < total or cfg.warmup_steps <= 1:
        return cfg
    capped = max(1, total // 10)
    if say:
        log.warning(f"note: `warmup_steps` {cfg.warmup_steps} is not shorter than the run's "
                    f"{total} steps, so the learning rate would never reach `lr`; warming up "
                    f"over {capped} steps instead (a tenth of the run)")
    return cfg.replace(warmup_steps=capped)


def _fork(cfg: TrainConfig, resume_dir: Path | None) -> tuple[TrainConfig, Path, Path | None]:
    """`fork_to` NEW_DIR: the settings with NEW_DIR as the run folder, the folder, and the
    run folder the checkpoint belongs to (whose history the fork starts with; None for a
    checkpoint outside a run's checkpoints/). NEW_DIR must not hold a run; leftovers of a
    fork that failed before its first checkpoint are pldr's."""
    if resume_dir is None:
        raise ConfigError("`fork_to=NEW_DIR` branches from a checkpoint: give `resume=CKPT` "
                          "(or `resume='auto'` with the run's `out`) as well")
    new = Path(cfg.fork_to)
    source = resume_dir.parent.parent
    if new.resolve() == source.resolve():
        raise ConfigError(f"`fork_to={str(new)!r}` is the checkpoint's own run; give a new "
                          "folder (or `truncate_later_steps=True` to rewind that run in place)")
    if is_run_dir(new):
        raise CheckpointError(f"`fork_to={str(new)!r}` already holds a training run; continue "
                              f"it with `resume='auto'` `out={str(new)!r}`, or choose another "
                              "folder")
    _check_leftovers(new, cfg.tokenizer)
    history = source if resume_dir.parent.name == CHECKPOINTS else None
    return cfg.replace(out=str(new), resume=str(resume_dir)), new, history


def _check_memory(config: PLDRConfig, cfg: TrainConfig, micro: int, context_length: int,
                  dist: ptd.DistInfo) -> None:
    """A run that cannot fit in memory is a one-line error before any allocation or write:
    weights, gradients and AdamW state (sharded over the ranks) and the activations of one
    forward of `micro` rows; on CPU the ranks of this machine share its RAM."""
    from ..model.memory import check_fits, training_memory

    need = training_memory(config, parameter_count(config), micro, context_length,
                           shards=dist.world_size,
                           autocast_bytes=2 if cfg.precision != "fp32" else 4)
    if dist.device.type == "cpu":
        need = need.scaled(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    check_fits(need, dist.device, "lower `micro_batch_size` (rows per forward) or "
               "`context_length`, or train a smaller `model` (d_model, num_layers, vocab_size)",
               "training this model")


def is_run_dir(out: Path) -> bool:
    """Whether `out` holds a training run worth keeping: a complete checkpoint or a final
    model. What a run that failed before its first checkpoint leaves (its settings,
    tokenizer, metrics, temporary folders) is pldr's own, and a fresh start replaces it."""
    return bool(list_checkpoints(out)) or (out / FINAL).exists()


def _check_leftovers(out: Path, tokenizer: str | None) -> None:
    """A fresh start replaces what a failed run left in `out` only if pldr wrote it (its
    train_config.json says so); files of these names that are the user's are never touched."""
    given = Path(tokenizer).resolve() if tokenizer is not None else None
    present = [name for name in RUN_ENTRIES if (out / name).exists()
               and not (name == TOKENIZER_FILE and (out / name).resolve() == given)]
    if present and not _written_by_train(out / TRAIN_CONFIG_FILE):
        raise CheckpointError(f"`out={str(out)!r}` holds {', '.join(present)} that training "
                              "did not write; choose another `out` (nothing was changed)")


def _written_by_train(path: Path) -> bool:
    """Whether `path` is a train_config.json that `make_run_folder` wrote."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"model_config", "world_size", "total_steps"} <= set(saved)


def _tensorboard(wanted: bool | None) -> bool:
    """`tensorboard`: True needs the package (a one-line error names the extra); None means
    "when installed"."""
    if wanted:
        import_extra("tensorboard", "tensorboard", "`tensorboard`")
        return True
    if wanted is not None:
        return False
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def _tokenizer(cfg: TrainConfig, base: PLDRConfig, resume_dir: Path | None, out: Path,
               train_split: str, dist: ptd.DistInfo) -> tuple[Any, list[str] | None]:
    """--tokenizer, else the resumed run's, else one trained on the data (on rank 0, sent
    to the other ranks so all use the same bytes). Also returns the training documents when
    they were read for training it (so the loader need not read them again)."""
    from ..data.store import is_store
    from ..data.tokenizer import Tokenizer

    if cfg.tokenizer is not None or is_store(cfg.data):  # a prepared store carries its own
        return Tokenizer.load(cfg.tokenizer or cfg.data), None
    if resume_dir is not None:
        for candidate in (resume_dir / TOKENIZER_FILE, out / TOKENIZER_FILE):
            if candidate.is_file():
                return Tokenizer.load(candidate), None
    proto, docs = None, None
    if dist.is_main:
        from ..data.sources import load_documents

        docs = load_documents(cfg.data, train_split, cfg.text_column)
        # SentencePiece samples this many documents when there are more (bounded memory)
        tokenizer = Tokenizer.train(docs, cfg.vocab_size or base.vocab_size,
                                    input_sentence_size=200_000, shuffle_input_sentence=True)
        proto = tokenizer.model_proto
    return Tokenizer(ptd.broadcast_object(proto, dist)), docs


def _loaders(cfg: TrainConfig, tokenizer: Any, context_length: int, train_split: str,
             val_split: str | None, train_docs: list[str] | None, dist: ptd.DistInfo,
             progress: bool) -> tuple[Any, Any]:
    """The training loader (this rank's rows of each global batch) and the validation
    loader, whose batch shrinks to fit a small validation split."""
    from ..data.chunks import Chunks
    from ..data.loader import TokenBatches, build_loaders
    from ..data.tokens import load_tokens

    train, _ = build_loaders(cfg.data, tokenizer, context_length, cfg.batch_size,
                             split=train_split, val_split="none", mode=cfg.chunk_mode,
                             batch_agg_count=cfg.batch_agg_count, seed=cfg.seed,
                             rank=dist.rank, world_size=dist.world_size, train_docs=train_docs,
                             text_column=cfg.text_column, cache_dir=cfg.cache_dir,
                             progress=progress)
    if val_split is None:
        return train, None
    docs = load_tokens(cfg.data, tokenizer, val_split, cfg.text_column, cache_dir=cfg.cache_dir,
                       progress=False)
    chunks = Chunks.from_tokens(docs, context_length + 1, cfg.chunk_mode,
                                cfg.batch_size * cfg.batch_agg_count)
    W = dist.world_size
    batch = min(cfg.batch_size, len(chunks) // W * W)
    if batch == 0:
        if dist.is_main:
            log.warning(f"note: the validation split {val_split} has fewer than {W} chunks of "
                        f"{context_length + 1} tokens; no validation")
        return train, None
    return train, TokenBatches(chunks, batch, shuffle=False, rank=dist.rank, world_size=W)


def make_run_folder(run: PreparedRun) -> None:
    """Create the output folder (only now that every input passed), write the tokenizer and
    the settings, and remove temporary folders of saves that were cut short."""
    if run.dist.is_main:
        (run.out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        remove_partial_saves(run.out)
        if run.fork_of is not None:
            copy_history(run.fork_of, run.out, int(read_trainer_state(run.resume_dir)["step"]),
                         run.tensorboard)
        if run.resume_dir is None or not (run.out / TOKENIZER_FILE).is_file():
            run.tokenizer.save(run.out / TOKENIZER_FILE)
        write_json(run.out / TRAIN_CONFIG_FILE,
                   {**run.cfg.to_dict(), "model_config": run.config.to_dict(),
                    "world_size": run.dist.world_size, "total_steps": run.total_steps,
                    "lr_total_steps": run.lr_total_steps})
    ptd.barrier(run.dist)


def build_model(config: PLDRConfig, device: torch.device, seed: int) -> PLDRModel:
    """A freshly initialised model: built on the meta device (no memory, no init), then
    materialised on `device` and initialised under `seed`, so every process (and a 1-process
    run) starts from the same weights."""
    with torch.device("meta"):
        model = PLDRModel(config)
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model


def build_training(run: PreparedRun) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (sharded with FSDP2 on several processes) in train mode, and its AdamW.

    --precision bf16-true casts the initialised weights to bfloat16 (so gradients and AdamW
    state are bfloat16 too); bf16-mixed keeps them float32 and, under torchrun, lets FSDP2
    gather bfloat16 parameters and reduce gradients in float32."""
    model = build_model(run.config, run.dist.device, run.cfg.seed)
    model.set_activation_checkpointing(run.cfg.activation_checkpointing)
    if WEIGHTS[run.cfg.precision] != torch.float32:
        model.to(WEIGHTS[run.cfg.precision])
    if run.dist.enabled:
        ptd.shard_model(model, run.amp_dtype)
    optimizer = make_optimizer(model, run.cfg.lr, run.cfg.weight_decay)
    return model.train(), optimizer


__all__ = ["PreparedRun", "prepare_run", "make_run_folder", "build_model", "build_training",
           "is_run_dir", "RUN_ENTRIES", "TRAIN_CONFIG_FILE"]
