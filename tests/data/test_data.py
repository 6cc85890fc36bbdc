"""The data pipeline: sources and splits, the token cache, chunking modes, and the sharded,
resumable batch loader. Everything runs offline on small local data."""

from __future__ import annotations

import json
import os
import time

import datasets
import numpy as np
import pytest
import torch

from pldr import data as D
from pldr.data import (Chunks, DataSource, Split, TokenBatches, TokenizedDocs, build_loaders,
                       chunk_tokens, load_documents, load_tokens, parse_source,
                       parse_split, token_cache_dir)
from pldr.errors import DataError
from pldr.data.tokenizer import Tokenizer

# Documents without blank lines (a .txt file separates documents with them).
DOCS = [f"Document {i}: some text {'x' * i}\nwith a second line, ünïcödé {i * 7}"
        for i in range(23)]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` offline and caching under tmp_path; our token cache there too."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "pldr-cache"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(load_documents("builtin"), 1000, model_type="bpe")


def write_formats(folder, docs=DOCS, column="content"):
    """The same documents as .txt, .jsonl, .json, .parquet and .csv files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, column: d} for i, d in enumerate(docs)]
    (folder / "d.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(folder / "d.parquet"))
    table.to_csv(str(folder / "d.csv"), index=False)
    return {ext: folder / f"d.{ext}" for ext in ("txt", "jsonl", "json", "parquet", "csv")}


# ----- splits and sources -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["train", "train[:90%]", "train[90%:95%]", "train[95%:]",
                                  "train[:1000]", "train[10:20]", "train[-5%:]", "train[-3:]",
                                  "train[33%:67%]", "train[:0]"])
@pytest.mark.parametrize("n", [0, 1, 7, 79, 1001])
def test_split_bounds_match_datasets(spec, n):
    ours = parse_split(spec).bounds(n)
    theirs = datasets.ReadInstruction.from_spec(spec).to_absolute({"train": n})[0]
    assert ours == (theirs.from_, max(theirs.from_, theirs.to))


def test_parse_split():
    assert parse_split(None) == Split("train")
    assert parse_split("validation[1_000:]") == Split("validation", "1000", "")
    assert str(parse_split("train[ :90% ]")) == "train[:90%]"
    for bad in ["train[", "train[a:]", "[:5]", "train[1:2:3]", "train[10%:20]"]:
        with pytest.raises(DataError, match="split"):
            parse_split(bad)


def test_parse_source(tmp_path):
    assert parse_source("builtin") == DataSource("builtin", "builtin")
    assert parse_source(D.DEFAULT_HF_DATA) == DataSource("hf", "tiiuae/falcon-refinedweb")
    assert parse_source("hf:org/name:cfg") == DataSource("hf", "org/name", "cfg")
    (tmp_path / "a.txt").write_text("x")
    assert parse_source(tmp_path / "a.txt").kind == "files"


def test_builtin_documents():
    from pydoc_data.topics import topics

    docs = load_documents("builtin")
    assert docs == [topics[k] for k in sorted(topics)]
    assert load_documents("builtin", "train[:10]") == docs[:10]
    assert load_documents("builtin", "train[90%:]") == docs[round(0.9 * len(docs)):]


@pytest.mark.parametrize("split", [None, "train[:50%]", "train[5:9]", "train[-10%:]"])
def test_local_formats_read_the_same_documents(tmp_path, split):
    files = write_formats(tmp_path)
    start, stop = parse_split(split).bounds(len(DOCS))
    expected = DOCS[start:stop]
    for ext, path in files.items():
        assert load_documents(path, split) == expected, ext


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\none\n  indented\n \n\t\n\ntwo\r\n\r\nthree\n\n\n", encoding="utf-8")
    assert load_documents(path) == ["one\n  indented", "two", "three"]


def test_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a1"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c1")
    (tmp_path / "notes.md").write_text("ignored: not a data format")
    (tmp_path / ".hidden.txt").write_text("ignored: hidden")
    assert load_documents(tmp_path) == ["a1", "b1", "b2", "c1"]


def test_text_column(tmp_path):
    rows = [{"body": f"b{i}", "text": f"t{i}", "meta": i} for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents(path) == ["t0", "t1", "t2"]  # `content` missing: falls back to `text`
    assert load_documents(path, text_column="body") == ["b0", "b1", "b2"]
    with pytest.raises(DataError, match="no text column 'nope'; its columns are body, text, meta"):
        load_documents(path, text_column="nope")
    path.write_text("".join(json.dumps({"body": r["body"]}) + "\n" for r in rows))
    with pytest.raises(DataError, match="no text column 'content' or 'text'; its columns are body"):
        load_documents(path)


def test_hf_source_on_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    (folder / "validation.jsonl").write_text(json.dumps({"content": "held out"}) + "\n")
    assert load_documents(f"hf:{folder}") == DOCS
    assert load_documents(f"hf:{folder}", "train[90%:]") == \
        load_documents(write_formats(tmp_path / "flat")["txt"], "train[90%:]")
    assert load_documents(f"hf:{folder}", "validation") == ["held out"]
    with pytest.raises(DataError, match="Unknown split"):
        load_documents(f"hf:{folder}", "test")


def test_hf_hub_name_offline_is_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(DataError, match="could not load hf:no-such-org/no-such-dataset.*offline"):
        load_documents("hf:no-such-org/no-such-dataset")
    assert time.perf_counter() - start < 10  # no retry loop


def test_hf_hub_unreachable_fails_fast(monkeypatch):
    """Online mode without a network: a quick probe replaces the hub client's retries."""
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(D.sources.socket, "create_connection", no_network)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("not reached"))
    with pytest.raises(DataError, match="Hugging Face Hub .* is not reachable.*HF_HUB_OFFLINE=1"):
        load_documents("hf:tiiuae/falcon-refinedweb")


# ----- data errors ------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass an existing file or folder"):
        load_documents(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", "\n \n\n"),
                                           ("empty.jsonl", "")])
def test_empty_data(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="holds no documents"):
        load_documents(tmp_path / name)


def test_empty_folder_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="has no .txt, .jsonl"):
        load_documents(tmp_path)
    (tmp_path / "data.xml").write_text("<doc/>")
    with pytest.raises(DataError, match="unknown data format '.xml'.*use .txt"):
        load_documents(tmp_path / "data.xml")


def test_split_errors(tmp_path):
    with pytest.raises(DataError, match="selects no documents"):
        load_documents("builtin", "train[100%:]")
    with pytest.raises(DataError, match="has only the split 'train'"):
        load_documents("builtin", "validation")


def test_unreadable_structured_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="could not read .*bad.jsonl as json"):
        load_documents(tmp_path / "bad.jsonl")


# ----- tokenisation and the cache ---------------------------------------------------------


def test_tokens_have_eos_per_document(tok, tmp_path):
    path = write_formats(tmp_path)["jsonl"]
    tokens = load_tokens(path, tok, progress=False)
    assert len(tokens) == len(DOCS) and tokens.num_tokens == len(tokens.ids)
    assert tokens.ids.dtype == np.uint16 and tokens.offsets.dtype == np.int64  # a store's ids
    for i, doc in enumerate(DOCS):
        assert tokens[i].tolist() == tok.encode(doc)


def test_tokenize_in_batches(tok):
    docs = load_documents("builtin")[:10]
    tokens = D.tokenize_documents(docs, tok, batch_docs=3, progress=False)
    assert [tokens[i].tolist() for i in range(len(tokens))] == tok.encode_batch(docs)
    assert len(D.tokenize_documents([], tok, progress=False)) == 0


def test_cache_hit_does_not_tokenise(tok, tmp_path, monkeypatch):
    first = load_tokens("builtin", tok, "train[:20]", progress=False)
    cached = sorted((tmp_path / "pldr-cache" / "tokens").iterdir())  # under PLDR_CACHE_DIR
    assert len(cached) == 1 and D.is_store(cached[0])  # the cache is a token store

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(Tokenizer, "encode_batch", fail)
    second = load_tokens("builtin", tok, "train[:20]", progress=False)
    np.testing.assert_array_equal(first.ids, second.ids)
    np.testing.assert_array_equal(first.offsets, second.offsets)
    with pytest.raises(AssertionError, match="tokenised again"):  # another split: a new key
        load_tokens("builtin", tok, "train[:21]", progress=False)


def test_cache_key_follows_file_changes_and_tokenizer(tok, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("alpha\n\nbeta")
    cache = tmp_path / "explicit-cache"
    a = load_tokens(path, tok, cache_dir=cache, progress=False)
    path.write_text("alpha\n\nbeta\n\ngamma")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    b = load_tokens(path, tok, cache_dir=cache, progress=False)
    assert (len(a), len(b)) == (2, 3)
    other = Tokenizer.train(load_documents("builtin"), 500, model_type="bpe")
    c = load_tokens(path, other, cache_dir=cache, progress=False)
    assert c[2].tolist() == other.encode("gamma")
    assert len([p for p in (cache / "tokens").iterdir() if D.is_store(p)]) == 3
    assert token_cache_dir(cache) == cache / "tokens"


def test_damaged_cache_file_is_rebuilt(tok, tmp_path):
    first = np.array(load_tokens("builtin", tok, "train[:3]", progress=False).ids)  # a copy:
    (cache_file,) = (tmp_path / "pldr-cache" / "tokens").glob("*/shard-*/tokens.bin")  # mapped
    cache_file.write_bytes(b"garbage")
    again = load_tokens("builtin", tok, "train[:3]", progress=False)
    np.testing.assert_array_equal(first, again.ids)


# ----- chunking ---------------------------------------------------------------------------

SAMPLES = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]  # 15 tokens


def test_chunk_pack():
    # One stream cut into 4s; the short remainder [13, 14, 15] at the end is dropped.
    expected = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert chunk_tokens(SAMPLES, 4, "pack") == expected
    assert chunk_tokens(SAMPLES, 4, "pack", group_size=2) == expected  # remainders carry over


def test_chunk_pad():
    # Groups of 2 samples: [1..5], [6..10], [11..15]; each group's last chunk padded with 0.
    assert chunk_tokens(SAMPLES, 3, "pad", group_size=2) == [
        [1, 2, 3], [4, 5, 0], [6, 7, 8], [9, 10, 0], [11, 12, 13], [14, 15, 0]]
    # Chunks of 4: each group's remainder is a single token, which is dropped.
    assert chunk_tokens(SAMPLES, 4, "pad", group_size=2) == [
        [1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14]]
    assert chunk_tokens(SAMPLES, 4, "pad") == [  # one group of everything
        [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 0]]


def test_chunk_nopad():
    assert chunk_tokens(SAMPLES, 3, "nopad", group_size=2) == [
        [1, 2, 3], [4, 5], [6, 7, 8], [9, 10], [11, 12, 13], [14, 15]]
    # Groups of 3 samples: [1..9] and [10..15].
    assert chunk_tokens(SAMPLES, 4, "nopad", group_size=3) == [
        [1, 2, 3, 4], [5, 6, 7, 8], [10, 11, 12, 13], [14, 15]]


def test_single_token_remainders_are_dropped():
    # A chunk of one token has nothing to predict; pad/nopad drop it.
    assert chunk_tokens([[1, 2, 3, 4, 5]], 4, "nopad") == [[1, 2, 3, 4]]
    assert chunk_tokens([[1, 2, 3, 4, 5]], 4, "pad") == [[1, 2, 3, 4]]


def test_chunking_errors():
    with pytest.raises(DataError, match="unknown chunking mode"):
        chunk_tokens(SAMPLES, 4, "squash")
    with pytest.raises(DataError, match="`chunk_len` must be"):
        chunk_tokens(SAMPLES, 1, "pack")


def test_chunk_spans_match_lists():
    rng = np.random.default_rng(0)
    samples = [rng.integers(1, 100, rng.integers(1, 30)).tolist() for _ in range(50)]
    docs = TokenizedDocs.from_lists(samples)
    for mode in D.MODES:
        for group in (None, 1, 3, 7):
            chunks = Chunks.from_tokens(docs, 9, mode, group)
            rows = chunks.rows(np.arange(len(chunks))).tolist()
            expected = chunk_tokens(samples, 9, mode, group)
            assert rows == [c + [0] * (9 - len(c)) for c in expected], (mode, group)


# ----- the loader -------------------------------------------------------------------------


def make_chunks(num_chunks=37, chunk_len=5, mode="pack"):
    """Chunk i holds the ids 1000*i + 1 ... so every row names its chunk."""
    samples = [[1000 * i + j + 1 for j in range(chunk_len)] for i in range(num_chunks)]
    return Chunks.from_tokens(TokenizedDocs.from_lists(samples), chunk_len, mode, 1)


def chunk_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] // 1000).tolist()


def test_batches_shape_and_coverage():
    loader = TokenBatches(make_chunks(), 4, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 9  # 37 // 4, the last incomplete batch dropped
    assert all(b.dtype == torch.long and b.shape == (4, 5) for b in batches)
    seen = [i for b in batches for i in chunk_ids(b)]
    assert len(set(seen)) == 36
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0


def test_same_seed_same_batches_and_epochs_differ():
    a = TokenBatches(make_chunks(), 4, seed=7)
    b = TokenBatches(make_chunks(), 4, seed=7)
    epoch0 = [x.tolist() for x in a]
    assert epoch0 == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != epoch0  # epoch 1 has another order
    assert [x.tolist() for x in TokenBatches(make_chunks(), 4, seed=8)] != epoch0
    in_order = [chunk_ids(x) for x in TokenBatches(make_chunks(), 4, shuffle=False)]
    assert in_order[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_two_ranks_split_each_global_batch():
    single = TokenBatches(make_chunks(), 6, seed=3)
    ranks = [TokenBatches(make_chunks(), 6, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in range(2):
        whole = list(single)
        parts = [list(r) for r in ranks]
        assert len(whole) == len(parts[0]) == len(parts[1]) == 6
        for step, batch in enumerate(whole):
            r0, r1 = parts[0][step], parts[1][step]
            assert r0.shape == r1.shape == (3, 5)
            assert not set(chunk_ids(r0)) & set(chunk_ids(r1))
            assert torch.equal(torch.cat([r0, r1]), batch)


def test_resume_at_batch_k():
    reference = TokenBatches(make_chunks(), 4, seed=5)
    epochs = [list(reference) for _ in range(2)]
    stream = [b for epoch in epochs for b in epoch]
    for k in (0, 3, 8, 9, 12):  # 9: exactly at the end of epoch 0
        loader = TokenBatches(make_chunks(), 4, seed=5)
        loader.load_state_dict({"epoch": k // 9, "step": k % 9})
        resumed = list(loader)
        if k % 9 == 0 and k:
            assert loader.state_dict()["epoch"] == 2
        assert all(torch.equal(x, y) for x, y in zip(resumed, stream[k:], strict=False))
        assert len(resumed) == 9 - k % 9


def test_resume_after_the_last_batch_of_an_epoch():
    """A run that stopped right after an epoch's last batch saved step == len(loader)."""
    reference = TokenBatches(make_chunks(), 4, seed=5)
    list(reference)
    epoch1 = [b.tolist() for b in reference]
    loader = TokenBatches(make_chunks(), 4, seed=5)
    loader.load_state_dict({"epoch": 0, "step": len(loader)})
    assert [b.tolist() for b in loader] == epoch1


def test_state_dict_mid_epoch_round_trip():
    loader = TokenBatches(make_chunks(), 4, seed=2)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()  # the next batch is 4
    rest = list(it)
    other = TokenBatches(make_chunks(), 4, seed=2)
    other.load_state_dict(state)
    assert [x.tolist() for x in other] == [x.tolist() for x in rest]
    with pytest.raises(DataError, match="saved seed is 2, this one has 9"):
        TokenBatches(make_chunks(), 4, seed=9).load_state_dict(state)


def test_iter_epoch_leaves_position_alone():
    loader = TokenBatches(make_chunks(), 4, shuffle=False)
    first = [b.tolist() for b in loader.iter_epoch()]
    assert [b.tolist() for b in loader.iter_epoch()] == first
    assert loader.state_dict()["step"] == 0
    assert loader.get_batch(2).tolist() == first[2]


def test_nopad_chunks_are_padded_in_batches():
    docs = TokenizedDocs.from_lists([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]])
    chunks = Chunks.from_tokens(docs, 4, "nopad", 1)
    assert chunks.lengths.tolist() == [4, 3, 3]
    batch = TokenBatches(chunks, 3, shuffle=False).get_batch(0)
    assert batch.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 10, 0]]


def test_loader_errors():
    with pytest.raises(DataError, match="divisible by the number of processes"):
        TokenBatches(make_chunks(), 5, world_size=2)
    with pytest.raises(DataError, match="rank"):
        TokenBatches(make_chunks(), 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size"):
        TokenBatches(make_chunks(), 0)


# ----- build_loaders ----------------------------------------------------------------------


def test_build_loaders_on_builtin(tok):
    train, val = build_loaders("builtin", tok, context_length=64, batch_size=8, seed=0,
                               progress=False)
    batch = next(iter(train))
    assert batch.shape == (8, 65) and batch.dtype == torch.long
    assert val is not None and len(val) > 0 and not val.shuffle
    docs = load_documents("builtin")
    n_train = parse_split(D.DEFAULT_TRAIN_SPLIT).bounds(len(docs))[1]
    train_tokens = sum(len(t) for t in tok.encode_batch(docs[:n_train]))
    assert len(train.chunks) == train_tokens // 65  # pack mode: the whole stream cut


def test_build_loaders_split_and_ranks(tok):
    kwargs = dict(context_length=32, batch_size=4, split="train[:50%]", seed=1, progress=False)
    train, val = build_loaders("builtin", tok, **kwargs)
    assert val is None  # a split without val_split: no validation
    halves = [build_loaders("builtin", tok, rank=r, world_size=2, **kwargs)[0] for r in (0, 1)]
    assert torch.equal(torch.cat([h.get_batch(3) for h in halves]), train.get_batch(3))
    _, val = build_loaders("builtin", tok, val_split="train[50%:60%]", mode="nopad", **kwargs)
    assert val is not None and next(iter(val)).shape == (4, 33)


def test_build_loaders_too_little_data(tok, tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        build_loaders(tmp_path / "tiny.txt", tok, 64, 8, split="train", progress=False)


def test_chunks_pad_with_the_given_pad_id():
    assert chunk_tokens([[1, 2, 3], [4, 5]], 4, "pad", group_size=1, pad_id=7) == [
        [1, 2, 3, 7], [4, 5, 7, 7]]
    docs = TokenizedDocs.from_lists([[1, 2, 3], [4, 5]])
    assert Chunks.from_tokens(docs, 4, "pad", 1, pad_id=7).rows([0, 1]).tolist() == [
        [1, 2, 3, 7], [4, 5, 7, 7]]
