"""What every command module shares: the parser class whose errors are one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import PLDRError

# the subfolder of a training run that holds its trained model (training/checkpointing.py)
RUN_FINAL = "final"


class Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one `error:` line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that ends each option's line with its default, except where there is nothing
    to show (a flag that is off, an empty list, None: those say their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def resolve_model(value: str, *, presets: bool, flag: str = "--model") -> str:
    """The one rule for what `--model` (and convert's SRC, info's CKPT) names, in every
    command: an existing path wins; else, where a fresh model makes sense (`presets`: train,
    bench), a preset name; else one line that lists what was looked for. A training run's
    folder given for a model is answered with its `final/` model when that exists."""
    from ..config import PRESETS

    path = Path(value).expanduser()
    if path.exists():
        final = path / RUN_FINAL
        if path.is_dir() and final.is_dir() and not (path / "config.json").exists():
            raise PLDRError(f"{flag} {value!r} is a training run folder, not a model; did you "
                            f"mean {str(final)!r}?")
        return value
    if presets and value in PRESETS:
        return value
    names = ", ".join(PRESETS)
    if presets:
        raise PLDRError(f"{flag} {value!r} is neither a preset ({names}) nor an existing path "
                        f"(looked for {str(path.absolute())!r})")
    what = (f"{value!r} is a preset, a fresh random model" if value in PRESETS
            else f"the presets {names} are fresh random models")
    raise PLDRError(f"{flag} {value!r} does not exist (looked for {str(path.absolute())!r}); "
                    f"give a model directory or checkpoint file ({what}, for pldr train and "
                    "pldr bench only)")


def model_rule(p: argparse.ArgumentParser, *, presets: bool, dest: str = "model",
               flag: str = "--model") -> None:
    """Declare that the command's `dest` argument names a model under `resolve_model`'s rule;
    `check_model_arg` applies it when the command runs (not while parsing, so a command
    line can be parsed, as the docs' examples are, without its files)."""
    p.set_defaults(model_rule=(dest, presets, flag))


def check_model_arg(args: argparse.Namespace) -> None:
    """Apply the declared `model_rule` to the parsed arguments (a PLDRError when it fails)."""
    rule = getattr(args, "model_rule", None)
    if rule is not None:
        dest, presets, flag = rule
        value = getattr(args, dest, None)
        if value is not None:
            resolve_model(value, presets=presets, flag=flag)


def add_model_args(p: argparse.ArgumentParser, *, G_LM_help: str, dtypes: tuple[str, ...],
                   dtype_help: str | None = None) -> None:
    """The flags every command that loads a model shares: --model, --config, --tokenizer,
    --G-LM (whose meaning the command gives), --device and --dtype (its choices)."""
    model_rule(p, presets=False)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model directory (pldr, or the transformers port's; a training run's "
                   "is RUN/final), or an original .pth checkpoint with --config")
    p.add_argument("--config", metavar="JSON", help="hpdict or config.json for an original checkpoint")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece .model (default: the model directory's tokenizer.model)")
    p.add_argument("--G-LM", dest="G_LM", metavar="FILE", help=G_LM_help)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=dtypes, default="float32", help=dtype_help)


def load_model_args(args: argparse.Namespace):
    """(model, G_LM) from the flags of `add_model_args`, for the inference commands
    (generate, serve): a given --G-LM wins in every variant; --dtype int8 loads float32
    weights on the CPU and quantises them; bfloat16 on a CPU packs its weights for oneDNN, or
    falls back to float32 (with a warning) where the CPU has no native bf16."""
    from ..checkpoint.load import load_for_decoding

    return load_for_decoding(args.model, args.config, G_LM=args.G_LM, device=args.device,
                             dtype=args.dtype)


def load_tokenizer_arg(args: argparse.Namespace, needed_for: str | None):
    """The tokenizer of --tokenizer, else of the --model directory (an original .pth has
    none); None when there is none and nothing needs it. `needed_for` names what needs one
    ("text prompts", "pldr serve"), which makes a missing tokenizer a one-line error."""
    from ..checkpoint.load import require_existing
    from ..data.tokenizer import Tokenizer

    require_existing(args.model)  # a missing --model is named as such, not as "no tokenizer"
    source = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    tok_file = Tokenizer.find(source) if source is not None else None
    if tok_file is None:
        if needed_for is None:
            return None
        raise PLDRError(f"{needed_for} need a tokenizer: pass --tokenizer FILE.model (model "
                        "directories written by pldr carry their own)")
    return Tokenizer.load(tok_file)
