"""The tokenizer: the paper's model gives SentencePiece's own ids plus EOS; trained models
round-trip any text exactly and carry the paper's special ids; `pldr tokenizer train`."""

from __future__ import annotations

import pickle

import pytest
import sentencepiece as spm
import torch

from conftest import reference_dir
from pldr.cli import main
from pldr.data import load_documents
from pldr.errors import DataError, PLDRError
from pldr.data.tokenizer import Tokenizer

PAPER_MODEL = "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"

TEXTS = [
    "Hello world",
    "",
    " ",
    "  two leading spaces, three   inside and trailing  ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nafter blank lines\n",
    "\r\nwindows\r\nline ends",
    "digits 1234567890 and 3.14159, -42",
    "Unicode: Grüße, naïve café, Ελληνικά, русский, עברית, العربية",
    "CJK 日本語の文章 中文 한국어",
    "emoji 😀👍🏽 🇹🇷 and ZWJ 👩‍👩‍👧",
    "control \x00\x07 chars and \u00a0 nbsp",
    "[SEP] [CLS] [PAD] look like specials",
]


@pytest.fixture(scope="module")
def paper() -> Tokenizer:
    return Tokenizer.load(reference_dir("tokenizer", PAPER_MODEL))


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A small unigram tokenizer trained on the builtin documents (about a second)."""
    return Tokenizer.train(load_documents("builtin"), 1000)


# ----- the paper's tokenizer --------------------------------------------------------------


def test_paper_tokenizer_known_ids(paper):
    assert paper.encode("Hello world") == [4780, 485, 3]
    assert paper.encode("") == [3]
    assert paper.encode("Hello world", eos=False) == [4780, 485]
    assert (paper.vocab_size, paper.pad_id, paper.eos_id, paper.bos_id) == (32000, 0, 3, 2)
    assert paper.special_ids == {0, 1, 2, 3, 4, 5}


def test_paper_tokenizer_is_sentencepiece_plus_eos(paper):
    sp = spm.SentencePieceProcessor(model_file=str(reference_dir("tokenizer", PAPER_MODEL)))
    for text in TEXTS:
        assert paper.encode(text) == sp.encode(text) + [3], text
    assert paper.encode_batch(TEXTS) == [sp.encode(t) + [3] for t in TEXTS]
    assert paper.encode_batch(TEXTS, eos=False, num_threads=1) == sp.encode(TEXTS)


def test_paper_tokenizer_decode_drops_specials(paper):
    ids = paper.encode("Hello world")
    assert paper.decode([0, 2, *ids, 4, 5, 0]) == "Hello world"
    assert paper.decode(torch.tensor(ids)) == "Hello world"


# ----- trained tokenizers -----------------------------------------------------------------


def test_trained_special_ids(trained):
    pieces = [trained.id_to_piece(i) for i in range(6)]
    assert pieces == ["[PAD]", "[UNK]", "[START]", "[END]", "[SEP]", "[CLS]"]
    assert (trained.vocab_size, trained.pad_id, trained.unk_id, trained.bos_id,
            trained.eos_id) == (1000, 0, 1, 2, 3)
    assert trained.encode("") == [3]
    assert trained.encode("x")[-1] == 3 and 2 not in trained.encode("x")


@pytest.mark.parametrize("text", TEXTS)
def test_trained_round_trip_is_exact(trained, text):
    ids = trained.encode(text)
    assert ids[-1] == trained.eos_id
    assert trained.decode(ids) == text
    assert trained.decode(torch.tensor(ids)) == text


def test_encode_batch_equals_encode(trained):
    assert trained.encode_batch(TEXTS) == [trained.encode(t) for t in TEXTS]


def test_save_load_and_pickle(trained, tmp_path):
    path = trained.save(tmp_path / "sub" / "tokenizer.model")
    for tok in (Tokenizer.load(path), Tokenizer.load(tmp_path / "sub"),
                pickle.loads(pickle.dumps(trained))):
        assert tok.encode_batch(TEXTS) == trained.encode_batch(TEXTS)
        assert tok.fingerprint == trained.fingerprint


def test_train_writes_model_and_vocab(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 50
    tok = Tokenizer.train(texts, 300, tmp_path / "tok", model_type="bpe")
    assert tok.path == tmp_path / "tok.model" and tok.path.is_file()
    vocab = (tmp_path / "tok.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 300 and vocab[3].split("\t")[0] == "[END]"
    assert Tokenizer.load(tok.path).encode("the cat") == tok.encode("the cat")


def test_train_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill first\n\nsecond document\n" * 30)
    as_path = Tokenizer.train([tmp_path / "a.txt"], 300, model_type="bpe")
    as_str = Tokenizer.train(str(tmp_path / "a.txt"), 300, model_type="bpe")
    assert as_path.model_proto == as_str.model_proto
    assert as_path.decode(as_path.encode("second document")) == "second document"


# ----- errors -----------------------------------------------------------------------------


def test_vocab_size_too_large():
    with pytest.raises(DataError, match=r"vocab size 50000 is too large for this data; the data "
                                        r"supports at most \d+"):
        Tokenizer.train(load_documents("builtin")[:5], 50000)


def test_vocab_size_too_small():
    with pytest.raises(DataError, match="too small for this data; it needs at least"):
        Tokenizer.train(load_documents("builtin")[:5], 100)


@pytest.mark.parametrize("bad", [[], ["", ""], iter([])])
def test_empty_training_input(bad):
    with pytest.raises(DataError, match="input is empty"):
        Tokenizer.train(bad, 300)


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(PLDRError, match="vocab_size"):
        Tokenizer.train(["text"], 0)
    with pytest.raises(DataError, match="wrap a single text in a list"):
        Tokenizer.train("just some text", 300)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.train([tmp_path / "missing.txt"], 300)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_decode_errors(trained):
    with pytest.raises(PLDRError, match="outside the tokenizer's vocabulary"):
        trained.decode([5, 1000])
    with pytest.raises(PLDRError, match="1-D"):
        trained.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(PLDRError, match="encode_batch"):
        trained.encode(["a list"])  # type: ignore[arg-type]


# ----- command line -----------------------------------------------------------------------


def test_cli_tokenizer_train(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("A first paragraph.\nWith two lines.\n\nA second one, 42.\n" * 40)
    assert main(["tokenizer", "train", "--input", str(data), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok"), "--model-type", "bpe"]) == 0
    assert "tok.model" in capsys.readouterr().out
    tok = Tokenizer.load(tmp_path / "tok.model")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("A second one")) == "A second one"

    assert main(["tokenizer", "train", "--data", "builtin", "--split", "train[:10]",
                 "--vocab-size", "400", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b.model").is_file() and (tmp_path / "b.vocab").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--input", "MISSING", "--vocab-size", "300"], "does not exist"),
    (["--data", "builtin", "--vocab-size", "99999"], "too large for this data"),
    (["--data", "builtin", "--split", "train[x:]", "--vocab-size", "300"], "is not valid"),
    (["--data", "builtin", "--vocab-size", "-3"], "--vocab-size must be a positive integer"),
])
def test_cli_tokenizer_train_bad_input(tmp_path, capsys, argv, message):
    argv = ["tokenizer", "train", *[a.replace("MISSING", str(tmp_path / "no.txt")) for a in argv],
            "--out", str(tmp_path / "tok")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["tokenizer"],
    ["tokenizer", "train", "--vocab-size", "300", "--out", "x"],  # no --input / --data
    ["tokenizer", "train", "--data", "builtin", "--vocab-size", "many", "--out", "x"],
])
def test_cli_tokenizer_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error:")
