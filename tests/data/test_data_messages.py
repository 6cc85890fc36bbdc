"""The data package's errors speak Python: they name the parameter a Python caller passed, in
backticks (`text_column`, `out`, `data`), never a command-line flag; the CLI boundary turns
each into the running command's flag (--text-column, --out, --data). That no library message
spells a flag is checked for every package by tests/test_messages.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pldr.cli.main import main as cli
from pldr.data import Tokenizer, load_documents, load_tokens, parse_source, prepare_store
from pldr.errors import DataError


# ----- the same errors from Python and from the command line --------------------------------


def cli_error(capsys, *argv: str) -> str:
    """The one `error:` line of a command that must fail with exit status 2."""
    assert cli(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "cache"))


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny", "--data", str(data), "--out", str(out),
            "--max-steps", "1", "--no-progress", "--no-tensorboard", *extra]


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)),
                    encoding="utf-8")
    return path


def test_a_missing_text_column_names_text_column(rows, tmp_path, capsys):
    with pytest.raises(DataError, match=r"columns are body: name one as `text_column`$") as e:
        load_documents(rows, text_column="content_text")
    assert e.value.param == "text_column"
    err = cli_error(capsys, "data", "prepare", "--data", str(rows), "--text-column", "nope",
                    "--out", str(tmp_path / "s"), "--no-progress")
    assert err.rstrip().endswith("columns are body: name one as --text-column"), err
    assert "`" not in err
    err = cli_error(capsys, *train_args(rows, tmp_path / "run", "--text-column", "nope"))
    assert err.rstrip().endswith("columns are body: name one as --text-column"), err
    assert not (tmp_path / "run").exists()


def test_a_store_of_another_column_names_text_column(rows, tmp_path, capsys):
    tok = Tokenizer.train(load_documents("builtin", "train[:40]"), 400)
    tok_file = tok.save(tmp_path / "tok.model")
    prepare_store(rows, tmp_path / "store", tok, text_column="body", progress=False)
    with pytest.raises(DataError, match="not 'content'; drop `text_column` or prepare") as e:
        load_tokens(tmp_path / "store", tok, text_column="content")
    assert e.value.param == "text_column"
    err = cli_error(capsys, *train_args(tmp_path / "store", tmp_path / "run", "--tokenizer",
                                        str(tok_file), "--text-column", "content"))
    assert "not 'content'; drop --text-column or prepare the data again" in err, err
    assert not (tmp_path / "run").exists()


def test_an_occupied_out_folder_names_out(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\n\nanother document\n", encoding="utf-8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a store")
    with pytest.raises(DataError, match=r"^`out` '.*mine' exists and is not a token store") as e:
        prepare_store(corpus, tmp_path / "mine", progress=False)
    assert e.value.param == "out"
    err = cli_error(capsys, "data", "prepare", "--data", str(corpus), "--out",
                    str(tmp_path / "mine"), "--no-progress")
    assert err.startswith(f"error: --out {str(tmp_path / 'mine')!r} exists and is not a token "
                          "store"), err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a store"


def test_a_missing_data_path_names_data(tmp_path, capsys):
    missing = str(tmp_path / "no-such-corpus.txt")
    with pytest.raises(DataError, match=r"^`data` path '.*no-such-corpus.txt' does not exist") as e:
        parse_source(missing)
    assert e.value.param == "data"
    with pytest.raises(DataError, match="^no data given; set `data` to 'builtin'") as e:
        parse_source("")
    assert e.value.param == "data"
    err = cli_error(capsys, "data", "prepare", "--data", missing, "--out", str(tmp_path / "s"))
    assert err.startswith(f"error: --data path {missing!r} does not exist"), err
    assert not (tmp_path / "s").exists()
