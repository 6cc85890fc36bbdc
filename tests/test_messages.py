"""The library speaks Python: its error messages and log lines name the parameter a Python
caller passed, in backticks (`batch_size`, `resume='auto'`), never a command-line flag. Only
the boundaries spell flags: pldr.cli (which renders each named parameter as the running
command's flag) and pldr.bench (a command-line tool's own report). A message may quote a
whole command line a user can run, in backticks: `pldr convert --dcp DIR --out MODEL_DIR`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pldr"
BOUNDARIES = ("cli", "bench")  # they speak the command line themselves
# a command line a message may quote: `pldr ...` in backticks (its flags are the command's)
COMMAND = re.compile(r"`pldr [^`]*`")
# --name, or --{...} of an f-string that builds one
FLAG = re.compile(r"(?<![\w-])--(?=[A-Za-z{])")
LOG_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
LOGGERS = {"log", "logger", "logging", "_log", "LOG"}


def is_message_call(node: ast.AST) -> bool:
    """A call that builds a message: an `...Error(...)` class (or a helper returning one),
    a `log.warning(...)`-style logging call, or `warnings.warn(...)`."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = getattr(func, "id", None) or getattr(func, "attr", "")
    if name.endswith("Error"):
        return True
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = func.value.id
        return (owner in LOGGERS and func.attr in LOG_LEVELS) or \
            (owner == "warnings" and func.attr == "warn")
    return False


def message_texts(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in a `raise` statement or a message call
    (`is_message_call`): plain strings as they are, f-strings with each placeholder as {}."""
    tree = ast.parse(source)
    roots = [n for n in ast.walk(tree) if isinstance(n, ast.Raise) or is_message_call(n)]
    found: dict[tuple[int, int], tuple[int, str]] = {}
    for root in roots:
        parts = {id(v) for n in ast.walk(root) if isinstance(n, ast.JoinedStr) for v in n.values}
        for n in ast.walk(root):
            if isinstance(n, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in parts:
                text = n.value
            else:
                continue
            found[(n.lineno, n.col_offset)] = (n.lineno, text)
    return sorted(found.values())


def flags_in(text: str) -> list[str]:
    """The `--flag` spellings of a message outside any quoted `pldr ...` command line."""
    return [m.group(0) + text[m.end():m.end() + 1]
            for m in FLAG.finditer(COMMAND.sub("", text))]


def library_modules() -> list[Path]:
    """Every module of src/pldr but the command-line boundaries."""
    return [p for p in sorted(SRC.rglob("*.py"))
            if p.relative_to(SRC).parts[0] not in BOUNDARIES]


def test_the_checker_sees_flags_in_raises_built_errors_and_log_lines():
    source = '''
def f(out, name):
    raise DataError(f"--out {out!r} is taken; choose another " "--out")
def g():
    return DataError("drop " "--text-column")
def h():
    raise DataError("see `pldr data info --verify` and `out`")
def i(name):
    log.warning(f"note: --warmup-steps is long; check --{name}")
    log.info("fine: `warmup_steps`")
    warnings.warn("use --lr")
    print("--not-a-message")
'''
    texts = message_texts(source)
    assert [flags_in(t) for _, t in texts] == [
        ["--o", "--o"], ["--t"], [], ["--w", "--{"], [], ["--l"]]


def test_the_walk_covers_the_library_and_skips_the_boundaries():
    modules = library_modules()
    packages = {p.relative_to(SRC).parts[0] for p in modules}
    assert {"data", "finetune", "analysis", "checkpoint", "training", "model", "inference",
            "serve", "errors.py", "devices.py"} <= packages
    assert not packages & set(BOUNDARIES)


def test_no_library_message_names_a_flag():
    bad, seen = [], 0
    for path in library_modules():
        for line, text in message_texts(path.read_text(encoding="utf-8")):
            seen += 1
            if flags_in(text):
                bad.append(f"{path.relative_to(SRC)}:{line}: {text}")
    assert seen > 400, f"only {seen} message strings found: is the walk looking at raises?"
    assert not bad, "messages that name a CLI flag instead of the Python parameter (write " \
        "`name` in backticks; the CLI renders it as the flag):\n" + "\n".join(bad)
