"""`Tokenizer`: a SentencePiece model with the special ids of the paper's tokenizer.

The paper's tokenizer (from the original release) is a 32000-piece SentencePiece unigram model with
byte fallback and split digits, and these special ids:

    0 [PAD]  padding, ignored by the loss      1 [UNK]    unknown (never produced: byte fallback)
    2 [START] BOS, not used for text           3 [END]    EOS, appended to every text
    4 [SEP]                                    5 [CLS]

Text is encoded without BOS and with EOS appended, as the original does for training data and
prompts. `Tokenizer.train` makes new models with the same ids, and with settings that make
`decode(encode(text)) == text` exactly for any text (no normalisation, whitespace kept as it
is, unknown characters spelled as bytes). One difference: in the paper's model [SEP] and [CLS]
are user-defined pieces, so the text "[SEP]" encodes to id 4 (and `decode` drops it); in a
trained model they are control pieces, never produced from text.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece as spm

from ..errors import DataError, PLDRError
from ..files import atomic_write_bytes

# Special pieces and their ids, as in the paper's tokenizer.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[START]", "eos": "[END]"}
SEP_CLS = ("[SEP]", "[CLS]")  # ids 4 and 5

# Training settings that make decode(encode(text)) == text for any text; see `Tokenizer.train`.
_TRAIN_DEFAULTS: dict[str, Any] = dict(
    model_type="unigram",
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
    bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
    # [SEP] and [CLS] take ids 4 and 5 as in the paper's tokenizer, but as control symbols,
    # not user-defined ones: the text "[SEP]" then encodes as ordinary pieces, so it decodes
    # back to itself while `decode` drops ids 4 and 5.
    control_symbols=list(SEP_CLS),
    byte_fallback=True,                  # any character is encodable (as UTF-8 bytes)
    split_digits=True,                   # as the paper's tokenizer
    normalization_rule_name="identity",  # no NFKC: text comes back unchanged
    remove_extra_whitespaces=False,      # keep runs of spaces, leading/trailing spaces
    allow_whitespace_only_pieces=True,   # so runs of spaces can become single pieces
    max_sentence_length=1 << 24,         # the default (4192 bytes) silently drops long documents
    minloglevel=2,                       # SentencePiece logs every step otherwise
)

# SentencePiece's messages when the vocabulary does not fit the data.
_TOO_HIGH_RE = re.compile(r"Vocabulary size too high \((\d+)\).*?<=\s*(\d+)")
_TOO_SMALL_RE = re.compile(
    r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class Tokenizer:
    """A SentencePiece model: encode text to ids (with EOS, no BOS) and decode ids to text.

    Build one with `Tokenizer.load(path)` or `Tokenizer.train(...)`; `Tokenizer(model_proto)`
    takes the serialized model bytes directly."""

    def __init__(self, model_proto: bytes, path: str | Path | None = None) -> None:
        self.model_proto = bytes(model_proto)
        self.path = Path(path) if path is not None else None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model_proto)
        except RuntimeError:
            where = f"{str(self.path)!r}" if self.path else "the given bytes"
            raise DataError(f"{where} is not a SentencePiece model file; pass the `.model` "
                            "file written by SentencePiece or Tokenizer.train (`pldr tokenizer "
                            "train`)") from None

    # ----- construction ------------------------------------------------------------------
    @staticmethod
    def find(path: str | Path) -> Path | None:
        """The file `load(path)` reads: `path` itself when it is a file, the `tokenizer.model`
        inside it when it is a model folder that has one; None otherwise. Lets a caller for
        whom a tokenizer is optional tell "there is none" from "it is broken"."""
        path = Path(path)
        if path.is_dir() and (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        return path if path.is_file() else None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a SentencePiece `.model` file, or the `tokenizer.model` inside a model folder."""
        found = cls.find(path)
        if found is None:
            raise DataError(f"tokenizer file {str(Path(path))!r} does not exist; pass the path "
                            "of a SentencePiece `.model` file (make one with Tokenizer.train or "
                            "`pldr tokenizer train`)")
        return cls(found.read_bytes(), path=found)

    def save(self, path: str | Path) -> Path:
        """Write the serialized model to `path` (e.g. `model_dir/tokenizer.model`), atomically."""
        path = Path(path)
        atomic_write_bytes(path, self.model_proto)
        return path

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as the model bytes (the SentencePiece processor itself is rebuilt)."""
        return {"model_proto": self.model_proto, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Tokenizer(vocab_size={self.vocab_size}{where})"

    # ----- ids ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces; ids are 0 .. vocab_size - 1."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        """Padding id (0 in the paper's tokenizer), ignored by the loss."""
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        """End-of-text id (3 in the paper's tokenizer), appended by `encode`."""
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        """Begin-of-text id (2 in the paper's tokenizer); `encode` never adds it."""
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode` drops: pad, unk, BOS, EOS and the [SEP]/[CLS] pieces if present."""
        ids = {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        for piece in SEP_CLS:
            i = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(i) == piece:
                ids.add(i)
        return frozenset(i for i in ids if i >= 0)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the model bytes: two tokenizers with equal fingerprints encode alike."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # ----- encode / decode ---------------------------------------------------------------
    def encode(self, text: str, eos: bool = True, parse_special: bool = False) -> list[int]:
        """Ids of `text`, without BOS and with EOS appended unless `eos=False`. With
        `parse_special` the text of a special piece ([START], [END], [SEP], [CLS]) becomes
        its id, as Hugging Face tokenizers (and so vLLM's server) read special tokens in a
        prompt; [PAD] and [UNK] stay text."""
        if not isinstance(text, str):
            raise PLDRError(f"encode takes a string, got {type(text).__name__}; use "
                            "encode_batch for a list of texts")
        _check_utf8(text)
        if not parse_special or self._special_pattern is None:
            return self._sp.encode(text, add_eos=eos)
        ids, pos = [], 0
        for m in self._special_pattern.finditer(text):
            if m.start() > pos:
                ids += self._sp.encode(text[pos:m.start()])
            ids.append(self._sp.piece_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self._sp.encode(text[pos:])
        return ids + [self.eos_id] if eos else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no EOS) and each piece's character span (start, end) in `text`,
        for mapping pieces back to text (a QA answer's span). A piece made of part of a
        character (a byte piece) spans that whole character or nothing."""
        if not isinstance(text, str):
            raise PLDRError(f"encode_with_offsets takes a string, got {type(text).__name__}")
        _check_utf8(text)
        proto = self._sp.encode(text, out_type="proto")
        # SentencePiece counts bytes of UTF-8; chars[b] is the character index of byte b
        chars = [0] * (len(text.encode("utf-8")) + 1)
        b = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            chars[b:b + n] = [i] * n
            b += n
        chars[b] = len(text)
        ids, spans = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            spans.append((chars[piece.begin], chars[piece.end]))
        return ids, spans

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """A regex of the special pieces `encode(parse_special=True)` reads (None if none)."""
        pieces = sorted({self.id_to_piece(i) for i in self.special_ids
                         if i not in (self.pad_id, self.unk_id)}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, pieces))) if pieces else None

    def encode_batch(self, texts: Sequence[str], eos: bool = True,
                     num_threads: int | None = None) -> list[list[int]]:
        """`encode` of each text, in parallel threads (all cores unless `num_threads`)."""
        if isinstance(texts, str):
            raise PLDRError("encode_batch takes a list of strings, got one string; use encode")
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise PLDRError(f"encode_batch takes strings, got a {type(bad).__name__}")
        threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        for t in texts:
            _check_utf8(t)
        return self._sp.encode(texts, add_eos=eos, num_threads=threads)

    def decode(self, ids: Any) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor/array); special ids are dropped."""
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            if getattr(ids, "ndim", 1) != 1:
                raise PLDRError(f"decode takes a 1-D sequence of ids, got shape "
                                f"{tuple(ids.shape)}; decode each row separately")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise PLDRError(f"token id {bad} is outside the tokenizer's vocabulary "
                            f"(0..{self.vocab_size - 1}); does the model's vocab_size match "
                            "the tokenizer?")
        special = self.special_ids
        return self._sp.decode([i for i in ids if i not in special])

    # ----- training ----------------------------------------------------------------------
    @classmethod
    def train(cls, texts_or_files: Iterable[str | os.PathLike] | str | os.PathLike,
              vocab_size: int, out_prefix: str | Path | None = None,
              **kwargs: Any) -> "Tokenizer":
        """Train a SentencePiece model with the paper tokenizer's special ids.

        `texts_or_files`: an iterable of texts (each one a training "sentence", newlines
        included), or of file paths (`pathlib.Path`s, or strings that name an existing file),
        whose text is split into documents at blank lines; or one path. `out_prefix`, if
        given, receives `<out_prefix>.model` and `<out_prefix>.vocab`. Extra keyword
        arguments go to `sentencepiece.SentencePieceTrainer.train` (e.g. `model_type="bpe"`,
        `input_sentence_size=1_000_000` to sample a large corpus) and override the defaults.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise PLDRError(f"`vocab_size` must be a positive integer, got {vocab_size!r}")
        sentences = _nonempty(_training_texts(texts_or_files))
        first = next(sentences, None)
        if first is None:
            raise DataError("no text to train the tokenizer on: the input is empty; pass "
                            "non-empty texts or files")
        settings = {**_TRAIN_DEFAULTS, "num_threads": os.cpu_count() or 1, **kwargs}
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=_chain(first, sentences),
                                           model_writer=model, vocab_size=vocab_size,
                                           **settings)
        except RuntimeError as e:
            raise _training_error(e, vocab_size) from None
        tok = cls(model.getvalue())
        if out_prefix is not None:
            out_prefix = Path(out_prefix)
            tok.path = tok.save(out_prefix.with_name(out_prefix.name + ".model"))
            tok._write_vocab(out_prefix.with_name(out_prefix.name + ".vocab"))
        return tok

    def _write_vocab(self, path: Path) -> None:
        """SentencePiece's `.vocab` file: one `piece<TAB>score` line per id."""
        lines = (f"{self._sp.id_to_piece(i)}\t{self._sp.get_score(i):g}\n"
                 for i in range(self.vocab_size))
        atomic_write_bytes(path, "".join(lines).encode("utf-8"))


# ----- helpers ----------------------------------------------------------------------------


def _training_texts(texts_or_files: Any) -> Iterator[str]:
    """The training texts: strings as they are, files read and split at blank lines."""
    if isinstance(texts_or_files, os.PathLike) or (isinstance(texts_or_files, str)
                                                    and _is_file(texts_or_files)):
        texts_or_files = [texts_or_files]
    elif isinstance(texts_or_files, (str, bytes)):
        raise DataError("Tokenizer.train takes a list of texts or file paths, got one string "
                        "that is not an existing file; wrap a single text in a list")
    for item in texts_or_files:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _is_file(item)):
            path = Path(item)
            if not path.is_file():
                raise DataError(f"tokenizer training file {str(path)!r} does not exist")
            yield from split_paragraphs(path.read_text(encoding="utf-8"))
        elif isinstance(item, str):
            yield item
        else:
            raise DataError(f"Tokenizer.train takes texts or file paths, got a "
                            f"{type(item).__name__}")


def _check_utf8(text: str) -> None:
    """SentencePiece needs text that is valid UTF-8; a command-line argument with invalid
    bytes arrives as lone surrogates (Python's surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PLDRError(f"the text is not valid UTF-8 (at character {e.start}: "
                        f"{text[e.start:e.start + 1]!r}); give UTF-8 text") from None


def split_paragraphs(text: str) -> list[str]:
    """Documents of a plain-text file: the blocks between blank lines, empty ones dropped."""
    text = text.replace("\r\n", "\n")
    parts = (p.strip("\n") for p in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text))
    return [p for p in parts if p.strip()]


def _is_file(item: str | os.PathLike) -> bool:
    """True for a path of an existing file (a long or multi-line string is text, not a path)."""
    s = os.fspath(item)
    if isinstance(item, str) and (len(s) > 4096 or "\n" in s or not s):
        return False
    try:
        return os.path.isfile(s)
    except (OSError, ValueError):
        return False


def _nonempty(texts: Iterator[str]) -> Iterator[str]:
    return (t for t in texts if t)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _training_error(e: RuntimeError, vocab_size: int) -> PLDRError:
    """SentencePiece's training error, reworded to say what to change."""
    msg = str(e)
    if m := _TOO_HIGH_RE.search(msg):
        return DataError(f"vocab size {vocab_size} is too large for this data; the data supports "
                         f"at most {m.group(2)}: lower the vocab size or train on more text")
    if "Vocabulary size too high" in msg:
        return DataError(f"vocab size {vocab_size} is too large for this data: lower the vocab "
                         "size or train on more text")
    if m := _TOO_SMALL_RE.search(msg):
        return DataError(f"vocab size {vocab_size} is too small for this data; it needs at least "
                         f"{m.group(2)} (6 special pieces, 256 byte pieces and the data's "
                         "characters): raise the vocab size")
    detail = msg.split("]")[-1].strip() or msg
    return DataError(f"SentencePiece could not train the tokenizer: {detail}")

