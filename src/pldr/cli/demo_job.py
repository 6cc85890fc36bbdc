"""`pldr demo`: the whole job in a few minutes on 2 CPU cores.

1. Train a SentencePiece tokenizer (2048 pieces) on the built-in corpus (Python's
   documentation topics) and the `tiny` preset on it with `pldr.train`.
2. Generate from a few prompts with the KV + G cache.
3. Show the loss curve's start and end and how much G_LM, the energy-curvature tensor the
   model infers from its input, varies between the prompts (the paper finds it nearly
   input-invariant for trained models).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import PLDRError
from ..errors import CheckpointError
from ..training.checkpointing import FINAL, list_checkpoints, read_trainer_state
from ..training.config import LEGACY_DTYPE, TrainConfig
from ..training.metrics import read_metrics
from ..training.prepare import RUN_ENTRIES
from ..training.trainer import train

PROMPTS = (
    "The import statement",
    "A class definition defines",
    "Exceptions are raised when",
    "The for statement is used to",
)
DEMO_STEPS = 600
DEMO_MARK = ".pldr-demo"  # marks a folder the demo made, which a rerun may clear


@dataclass
class DemoResult:
    """What the demo did: the run folder, the loss curve's ends, samples and G_LM spread."""

    out_dir: Path
    first_loss: float
    last_loss: float
    val_loss: float | None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)
    g_spread: list[float] = field(default_factory=list)  # per layer, see `g_lm_spread`


def demo_config(out: str | Path = "runs/demo", steps: int = DEMO_STEPS,
                device: str | None = None, dtype: str = "float32",
                progress: bool | None = None, seed: int = 0) -> TrainConfig:
    """The demo's training run: the tiny preset on the built-in corpus, 16 x 128 tokens per
    step (about 0.2 s per step in float32 on 2 CPU cores)."""
    return TrainConfig(model="tiny", data="builtin", out=str(out), vocab_size=2048,
                       max_steps=steps, batch_size=16, context_length=128, lr=2e-3,
                       warmup_steps=max(1, steps // 10), lr_alpha=0.1, weight_decay=0.1,
                       log_every=max(1, steps // 20), eval_every=max(1, steps // 4),
                       keep_checkpoints=1, device=device,
                       precision=LEGACY_DTYPE[dtype], seed=seed,
                       progress=progress)


def clear_previous_demo(out: Path) -> None:
    """Make room for a demo run in `out`: a folder the demo made before (it holds DEMO_MARK)
    loses the entries a run writes, and nothing else; a missing or empty folder is used as
    it is; any other folder is refused with one line, and nothing in it is deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PLDRError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
    if not (out / DEMO_MARK).is_file():
        if any(out.iterdir()):
            raise PLDRError(f"--out {str(out)!r} is a folder `pldr demo` did not make; it "
                            "deletes nothing there: choose a new or empty folder for --out")
        return
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# settings that may differ between an interrupted demo and the rerun that continues it
_PER_RUN = frozenset({"resume", "progress", "truncate_later_steps", "fork_to"})


def interrupted_demo(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint a rerun of the demo continues from: `out` is a demo's folder with a
    complete checkpoint, no final model yet, and a run of the same settings (`cfg`: steps,
    device, dtype, seed); None otherwise (the demo then starts over)."""
    if not (out / DEMO_MARK).is_file() or (out / FINAL).exists():
        return None
    found = list_checkpoints(out)
    if not found:
        return None
    try:
        saved = read_trainer_state(found[-1]).get("train_config", {})
    except CheckpointError:
        return None  # damaged: start over
    mine = {k: v for k, v in cfg.to_dict().items() if k not in _PER_RUN}
    return found[-1] if all(saved.get(k) == v for k, v in mine.items()) else None


def demo_command(out: Path, steps: int, device: str | None, dtype: str) -> str:
    """The `pldr demo` command line of these settings (what a rerun must repeat)."""
    parts = ["pldr demo", f"--out {out}"]
    if steps != DEMO_STEPS:
        parts.append(f"--steps {steps}")
    if device is not None:
        parts.append(f"--device {device}")
    if dtype != "float32":
        parts.append(f"--dtype {dtype}")
    return " ".join(parts)


@torch.no_grad()
def g_lm_spread(model: Any, prompts: list[list[int]]) -> list[float]:
    """Per layer, how much the inferred G_LM differs between prompts: the Frobenius norm of its
    standard deviation over prompts divided by the norm of its mean (0: the same G_LM for
    every prompt)."""
    from ..model.model import infer_G_LM

    per_prompt = [torch.stack(infer_G_LM(model, torch.tensor(ids)[None])) for ids in prompts]
    G = torch.stack(per_prompt).float()  # [P, L, 1, H, dk, dk]
    std, mean = G.std(dim=0), G.mean(dim=0)
    return [float(std[i].norm() / mean[i].norm().clamp_min(1e-12)) for i in range(G.shape[1])]


def run_demo(out: str | Path = "runs/demo", steps: int = DEMO_STEPS, device: str | None = None,
             dtype: str = "float32", progress: bool | None = None, seed: int = 0,
             max_new_tokens: int = 40, fresh: bool = False) -> DemoResult:
    """Train, generate and report (see the module docstring); prints as it goes.

    `out` must be new, empty, or a previous demo's folder (see `clear_previous_demo`). A
    demo that was interrupted (Ctrl-C saves a checkpoint) is continued from its checkpoint
    when run again with the same settings, unless `fresh`; a finished one is replaced."""
    from ..checkpoint.load import load_model
    from ..data.tokenizer import Tokenizer
    from ..inference.generate import generate

    out = Path(out)
    resolve_device(device, 0)  # a device this build lacks fails before any folder is made
    cfg = demo_config(out, steps, device, dtype, progress, seed)
    ckpt = None if fresh else interrupted_demo(out, cfg)
    if ckpt is None:
        clear_previous_demo(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARK).write_text("written by `pldr demo`: a rerun continues this run if "
                                     "it was interrupted, else replaces it\n", encoding="utf-8")
        print(f"pldr demo: training the tiny preset on the built-in corpus for {steps} steps "
              f"(batch {cfg.batch_size} x {cfg.context_length} tokens, {dtype}) into {out}",
              flush=True)
    else:
        cfg = cfg.replace(resume="auto")
        print(f"pldr demo: continuing the interrupted demo in {out} from {ckpt.name} "
              f"(--fresh starts over)", flush=True)
    command = demo_command(out, steps, device, dtype)
    result = train(cfg, continue_hint=f"rerun `{command}` to continue from it")
    if result.interrupted:
        raise KeyboardInterrupt
    records = read_metrics(out)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    val = [r["loss"] for r in records if r["split"] == "val"]

    model = load_model(result.final_dir, device=resolve_device(device, 0))  # where it trained
    tok = Tokenizer.load(result.final_dir)  # the tokenizer.model in the model folder
    prompt_ids = [tok.encode(p, eos=False) for p in PROMPTS]
    new = generate(model, prompt_ids, max_new_tokens, cache="kv_g", temperature=0.8, top_k=40,
                   seed=seed)
    samples = [(p, tok.decode(ids)) for p, ids in zip(PROMPTS, new)]
    spread = g_lm_spread(model, prompt_ids)

    demo = DemoResult(out, train_losses[0], train_losses[-1], val[-1] if val else None,
                      samples, spread)
    print()
    print(f"loss: {demo.first_loss:.3f} at the first report -> {demo.last_loss:.3f} at step "
          f"{result.step}" + (f" (validation {demo.val_loss:.3f})" if val else ""))
    print("samples (KV + G cache, temperature 0.8, top-k 40):")
    for prompt, text in samples:
        print(f"  {prompt!r} -> {' '.join(text.split())!r}")
    print("G_LM spread between the prompts, per layer (std / mean, Frobenius): "
          + ", ".join(f"{v:.4f}" for v in spread))
    print(f"model: {result.final_dir}  (try: pldr generate --model {result.final_dir} "
          "--prompt 'The with statement')")
    return demo


__all__ = ["run_demo", "demo_config", "g_lm_spread", "clear_previous_demo", "DemoResult",
           "interrupted_demo", "demo_command",
           "PROMPTS", "DEMO_MARK"]
