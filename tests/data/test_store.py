"""Token stores (`pldr data prepare`): streamed reading, parallel tokenising, resumable atomic
shards, memory-mapped reading, and training from a store as from its source. The corpus is
RefinedWeb-shaped parquet (content, url, timestamp, dump, segment, image_urls) written here."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pldr import PLDRConfig
from pldr.cli.main import main as cli
from pldr.data import build_loaders, load_documents, load_tokens
from pldr.data import prepare as P
from pldr.data.sources import parse_source, stream_source
from pldr.data.store import ShardedTokens, is_store, token_dtype
from pldr.data.tokenizer import Tokenizer
from pldr.errors import DataError
from pldr.files import is_temp_name

SMALL_SHARDS = dict(shard_tokens=3000, batch_chars=4000)  # many shards from a small corpus


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("PLDR_CACHE_DIR", str(tmp_path / "pldr-cache"))


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    Tokenizer.train(load_documents("builtin"), 1000, model_type="bpe").save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_file) -> Tokenizer:
    return Tokenizer.load(tok_file)


def variations(n: int, seed: int = 0) -> list[str]:
    """`n` documents: Python's documentation topics, cut and varied, plus odd ones."""
    base = load_documents("builtin")
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        text = base[i % len(base)]
        cut = int(rng.integers(1, len(text) + 1))
        docs.append(f"[{i}] " + text[:cut] + ("  ünïcödé ✓\n\n\t" if i % 7 == 0 else ""))
    docs[3] = ""  # an empty document is still one document (its EOS)
    return docs


def write_refinedweb(folder: Path, docs: list[str], files: int = 2, row_group: int = 16,
                     null_at: int | None = 5) -> Path:
    """`docs` as RefinedWeb-shaped parquet files (several row groups each) in `folder`; the
    row at `null_at` has no content (skipped by every reader)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(docs)
    if null_at is not None:
        rows.insert(null_at, None)
    per = -(-len(rows) // files)
    schema = pa.schema([("content", pa.string()), ("url", pa.string()),
                        ("timestamp", pa.timestamp("s")), ("dump", pa.string()),
                        ("segment", pa.string()), ("image_urls", pa.list_(pa.list_(pa.string())))])
    for f in range(files):
        part = rows[f * per:(f + 1) * per]
        table = pa.table({
            "content": part,
            "url": [f"https://example.com/{f}/{i}" for i in range(len(part))],
            "timestamp": [datetime.datetime(2023, 1, 1) + datetime.timedelta(minutes=i)
                          for i in range(len(part))],
            "dump": ["CC-MAIN-2023-06"] * len(part),
            "segment": [f"1674.{i}" for i in range(len(part))],
            "image_urls": [[[f"https://img/{i}.png", "alt"]] if i % 3 else [] for i in
                           range(len(part))]}, schema=schema)
        pq.write_table(table, folder / f"part-{f:05d}.parquet", row_group_size=row_group)
    return folder


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, for exact comparisons."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = variations(300)
    return write_refinedweb(tmp_path_factory.mktemp("rw") / "refinedweb", docs), docs


# ----- streaming ----------------------------------------------------------------------------


def test_stream_gives_the_documents_of_load_documents(tmp_path, corpus):
    folder, docs = corpus
    assert load_documents(folder) == docs
    assert list(stream_source(folder).documents()) == docs
    assert list(stream_source(folder, "train[7:40]").documents()) == docs[7:40]
    src = tmp_path / "src"  # apart from the `datasets` cache in tmp_path
    src.mkdir()
    small = variations(40)
    rows = [{"id": i, "content": d} for i, d in enumerate(small)]
    (src / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(src / "d.csv"), index=False)
    (src / "d.txt").write_text("one\n\n  \ntwo\n  still two\n\n\n\nthree\n \t\n")
    for name in ("d.jsonl", "d.json", "d.csv", "d.txt"):
        assert list(stream_source(src / name).documents()) == \
            load_documents(src / name), name
    assert list(stream_source(src).documents()) == load_documents(src)
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "train.jsonl").write_text((src / "d.jsonl").read_text())
    assert list(stream_source(f"hf:{hf}").documents()) == small


def test_txt_parts_split_as_the_whole_text_splits(tmp_path):
    from pldr.data.tokenizer import split_paragraphs

    rng = np.random.default_rng(1)
    alphabet = np.array(list("ab \t\n\n\ré"))
    for trial in range(300):
        text = "".join(rng.choice(alphabet, int(rng.integers(0, 50))))
        (tmp_path / "t.txt").write_bytes(text.encode())
        want = split_paragraphs((tmp_path / "t.txt").read_text(encoding="utf-8"))
        for block in (1, 2, 5):  # byte ranges of a few bytes, cut anywhere
            stream = stream_source(tmp_path / "t.txt", part_bytes=block)
            assert [d for p in stream.parts for d in p.documents()] == want, (text, block)
            if want:
                assert list(stream.documents()) == want
            else:
                with pytest.raises(DataError, match="holds no documents"):
                    list(stream.documents())


def test_stream_splits():
    docs = load_documents("builtin")
    stream = stream_source("builtin", "train[:90%]")  # a percentage counts the parts first
    assert list(stream.documents()) == docs[:round(0.9 * len(docs))]
    assert list(stream_source("builtin", "train[-5:]").documents()) == docs[-5:]
    with pytest.raises(DataError, match="only the split 'train'"):
        stream_source("builtin", "validation")


# ----- preparing --------------------------------------------------------------------------


def test_store_tokens_equal_direct_tokenisation(tmp_path, corpus, tok):
    folder, docs = corpus
    report = P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    store = report.store
    assert is_store(tmp_path / "s") and parse_source(tmp_path / "s").kind == "store"
    assert len(store.manifest["shards"]) > 5 and store.manifest["dtype"] == "uint16"
    assert store.num_documents == len(docs) == store.manifest["documents"]
    direct = load_tokens(folder, tok, "train", use_cache=False, progress=False)
    ids, offsets = store.slice("train")
    assert np.array_equal(np.asarray(ids), direct.ids)
    assert np.array_equal(offsets, direct.offsets)
    assert store.tokens.shards[0].dtype == np.uint16 and isinstance(store.tokens.shards[0],
                                                                     np.memmap)
    for i in (0, 3, 150, len(docs) - 1):
        assert ids[offsets[i]:offsets[i + 1]].tolist() == tok.encode(docs[i])
    # a slice of the store = the same slice of the source
    sliced = load_tokens(tmp_path / "s", tok, "train[90%:]")
    want = load_tokens(folder, tok, "train[90%:]", use_cache=False, progress=False)
    assert np.array_equal(np.asarray(sliced.ids), want.ids)
    assert np.array_equal(sliced.offsets, want.offsets)
    assert store.verify() == []
    assert store.manifest["tokenizer"]["sha256"] == tok.fingerprint
    assert sum(s["tokens"] for s in store.manifest["shards"]) == store.num_tokens


def test_one_and_two_workers_give_identical_stores(tmp_path, corpus, tok):
    folder, _ = corpus
    P.prepare_store(folder, tmp_path / "w1", tok, workers=1, progress=False, **SMALL_SHARDS)
    P.prepare_store(folder, tmp_path / "w2", tok, workers=2, progress=False, **SMALL_SHARDS)
    one, two = store_files(tmp_path / "w1"), store_files(tmp_path / "w2")
    assert len(one) > 10 and one == two


@pytest.mark.parametrize("shape", ["files", "row_groups"])
def test_the_store_is_the_same_for_1_2_and_3_workers(tmp_path, tok, shape):
    """Workers read their own parts (.txt byte ranges, .jsonl files, parquet row groups);
    the store does not depend on how many there are, and holds the source's tokens."""
    docs = variations(240, seed=7)
    if shape == "files":  # a multi-file corpus of three formats
        folder = tmp_path / "mixed"
        write_refinedweb(folder / "c", docs[160:], files=2, row_group=10, null_at=None)
        (folder / "a.txt").write_text("\n\n".join(docs[:100]), encoding="utf-8")
        (folder / "b.jsonl").write_text("".join(json.dumps({"content": d}) + "\n"
                                                for d in docs[100:160]), encoding="utf-8")
    else:  # one parquet file of many row groups
        folder = write_refinedweb(tmp_path / "one", docs, files=1, row_group=12)
        assert pq.ParquetFile(next(folder.iterdir())).num_row_groups == 21
    stores = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        P.prepare_store(folder, out, tok, workers=workers, progress=False, **SMALL_SHARDS)
        stores.append(store_files(out))
    assert stores[0] == stores[1] == stores[2]
    store = P.TokenStore.open(tmp_path / "w3")
    assert len(store.manifest["shards"]) > 3  # several tasks, so several shards
    direct = load_tokens(folder, tok, use_cache=False, progress=False)
    ids, offsets = store.slice()
    assert np.array_equal(np.asarray(ids), direct.ids)
    assert np.array_equal(offsets, direct.offsets)


def test_interrupted_prepare_resumes_to_the_same_store(tmp_path, corpus, tok, monkeypatch):
    folder, _ = corpus
    P.prepare_store(folder, tmp_path / "ref", tok, progress=False, **SMALL_SHARDS)
    with monkeypatch.context() as m:
        interrupt_at_shard(m, 3)  # stops in the middle, with a half-written shard
        with pytest.raises(KeyboardInterrupt):
            P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    assert not is_store(tmp_path / "s") and (tmp_path / "s" / "prepare.json").is_file()
    with pytest.raises(DataError, match="did not finish"):
        load_tokens(tmp_path / "s", tok)
    report = P.prepare_store(folder, tmp_path / "s", None, progress=False, **SMALL_SHARDS)
    assert report.resumed_shards == 3
    assert store_files(tmp_path / "s") == store_files(tmp_path / "ref")
    again = P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    assert again.already_complete and again.text_bytes == 0


def test_kill_9_then_the_same_command_gives_the_same_store(tmp_path, tok_file):
    docs = variations(800, seed=2)
    folder = write_refinedweb(tmp_path / "big", docs, files=3, row_group=64)
    flags = ["--shard-tokens", "4000", "--batch-chars", "6000"]
    command = [sys.executable, "-m", "pldr", "data", "prepare", "--data", str(folder),
               "--tokenizer", str(tok_file), "--out", str(tmp_path / "s"), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    third = tmp_path / "s" / "shard-000002"
    deadline = time.monotonic() + 120
    while not third.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert third.is_dir() and not is_store(tmp_path / "s")
    first_inode = (tmp_path / "s" / "shard-000000" / "tokens.bin").stat().st_ino
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kept from before" in done.stdout
    assert (tmp_path / "s" / "shard-000000" / "tokens.bin").stat().st_ino == first_inode
    assert not any(is_temp_name(p.name) for p in (tmp_path / "s").iterdir())
    P.prepare_store(str(folder), tmp_path / "ref", Tokenizer.load(tok_file), progress=False,
                    shard_tokens=4000, batch_chars=6000)
    assert store_files(tmp_path / "s") == store_files(tmp_path / "ref")


def test_prepare_refuses_what_it_cannot_continue(tmp_path, corpus, tok):
    folder, _ = corpus
    other = Tokenizer.train(load_documents("builtin"), 600, model_type="bpe")
    P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    with pytest.raises(DataError, match="another tokenizer"):
        P.prepare_store(folder, tmp_path / "s", other, progress=False, **SMALL_SHARDS)
    with pytest.raises(DataError, match=r"^`out` '.*' holds a token store of other data or "
                       r"settings .*; choose another `out`") as err:
        P.prepare_store("builtin", tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    assert err.value.param == "out"
    with pytest.raises(DataError, match="other data or settings"):
        P.prepare_store(folder, tmp_path / "s", tok, progress=False, shard_tokens=5000)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="^`out` '.*' exists and is not a token store") as err:
        P.prepare_store(folder, tmp_path / "junk", tok, progress=False)
    assert err.value.param == "out"
    (tmp_path / "early").mkdir()  # killed after saving the tokenizer, before prepare.json
    tok.save(tmp_path / "early" / "tokenizer.model")
    assert P.prepare_store(folder, tmp_path / "early", tok, progress=False).store.num_documents
    with pytest.raises(DataError, match="`workers` must be a positive") as err:
        P.prepare_store(folder, tmp_path / "w0", tok, workers=0)
    assert err.value.param == "workers"
    with pytest.raises(DataError, match="holds token ids, not documents"):
        load_documents(tmp_path / "s")


def interrupt_at_shard(monkeypatch, index: int) -> None:
    """Make prepare_store stop (as Ctrl-C would) when it is about to finish shard `index`."""
    real_close = P._ShardWriter.close

    def close(self):
        if self.index == index and self.tmp is not None:
            raise KeyboardInterrupt
        real_close(self)

    monkeypatch.setattr(P._ShardWriter, "close", close)


def test_a_changed_source_is_not_resumed(tmp_path, tok, monkeypatch):
    folder = write_refinedweb(tmp_path / "rw", variations(120))
    with monkeypatch.context() as m:
        interrupt_at_shard(m, 2)
        with pytest.raises(KeyboardInterrupt):
            P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    write_refinedweb(folder, variations(120, seed=9))
    with pytest.raises(DataError, match="other data"):
        P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    # the same size and modification time, other text: found by the shards' text checksums
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(variations(120)).replace("\n\n\t", "\n\n"))
    with monkeypatch.context() as m:
        interrupt_at_shard(m, 2)
        with pytest.raises(KeyboardInterrupt):
            P.prepare_store(text, tmp_path / "t", tok, progress=False, **SMALL_SHARDS)
    stat = text.stat()
    text.write_text(text.read_text().replace("[1]", "[9]", 1))
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="not the ones the source gives now"):
        P.prepare_store(text, tmp_path / "t", tok, progress=False, **SMALL_SHARDS)


def test_without_a_tokenizer_one_is_trained_and_kept(tmp_path, corpus):
    folder, _ = corpus
    report = P.prepare_store(folder, tmp_path / "s", None, vocab_size=400, sample_docs=100,
                             progress=False, **SMALL_SHARDS)
    tok = report.store.tokenizer()
    assert tok.vocab_size == 400 and report.store.tokenizer_sha256 == tok.fingerprint
    ids, offsets = report.store.slice()
    assert ids[offsets[0]:offsets[1]].tolist() == tok.encode(load_documents(folder)[0])


def test_large_vocabularies_use_uint32(tmp_path, corpus, tok, monkeypatch):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    folder, _ = corpus
    monkeypatch.setattr(P, "token_dtype", lambda v: np.dtype(np.uint32))
    store = P.prepare_store(folder, tmp_path / "s", tok, workers=2, progress=False,
                            **SMALL_SHARDS).store
    assert store.manifest["dtype"] == "uint32" and store.tokens.dtype == np.uint32
    direct = load_tokens(folder, tok, use_cache=False, progress=False)
    assert np.array_equal(np.asarray(store.slice()[0]), direct.ids)


def test_sharded_tokens_slice_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype(np.uint16) for n in (5, 1, 17, 3, 9)]
    whole = np.concatenate(parts)
    ids = ShardedTokens(parts)
    view = ids.view(4, 30)
    for _ in range(200):
        a, b = sorted(int(x) for x in rng.integers(0, len(whole) + 1, 2))
        assert np.array_equal(ids[a:b], whole[a:b])
        c, d = sorted(int(x) for x in rng.integers(0, len(view) + 1, 2))
        assert np.array_equal(view[c:d], whole[4:30][c:d])
    assert len(view) == 26 and view[0] == whole[4] and view[-1] == whole[29]
    assert np.array_equal(np.asarray(view), whole[4:30])


# ----- reading: loaders and training -------------------------------------------------------


@pytest.mark.parametrize("mode", ["pack", "pad", "nopad"])
def test_store_and_source_give_the_same_batches(tmp_path, corpus, tok, mode):
    folder, _ = corpus
    P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    for rank in (0, 1):
        kw = dict(context_length=31, batch_size=4, mode=mode, seed=3, rank=rank, world_size=2,
                  progress=False, batch_agg_count=2)
        src_train, src_val = build_loaders(folder, tok, cache_dir=tmp_path / "c", **kw)
        st_train, st_val = build_loaders(tmp_path / "s", tok, **kw)
        assert len(src_train) == len(st_train) > 3
        for a, b in zip(src_train, st_train):
            assert a.dtype == b.dtype and bool((a == b).all())
        for a, b in zip(src_val.iter_epoch(), st_val.iter_epoch()):
            assert bool((a == b).all())
        st_train.load_state_dict(src_train.state_dict())  # resume state carries over


def test_a_store_with_another_tokenizer_is_a_clear_error(tmp_path, corpus, tok, tok_file):
    folder, _ = corpus
    P.prepare_store(folder, tmp_path / "s", tok, progress=False, **SMALL_SHARDS)
    other = tmp_path / "other.model"
    Tokenizer.train(load_documents("builtin"), 700, model_type="bpe").save(other)
    with pytest.raises(DataError, match="another tokenizer"):
        build_loaders(tmp_path / "s", Tokenizer.load(other), 32, 4, progress=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(["data", "info", str(tmp_path / "s"), "--tokenizer",
                              str(other)]) == 2
    assert err.getvalue().startswith("error: the token store") and "\n" == err.getvalue()[-1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["data", "info", str(tmp_path / "s"), "--tokenizer", str(tok_file),
                              "--verify", "--json"]) == 0
    info = json.loads(out.getvalue())
    assert info["documents"] == 300 and info["verified"] and info["dtype"] == "uint16"


def test_cli_prepare_and_info(tmp_path, corpus, tok_file):
    folder, _ = corpus
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["data", "prepare", "--data", str(folder), "--tokenizer",
                              str(tok_file), "--out", str(tmp_path / "s"), "--workers", "2",
                              "--no-progress"]) == 0
        assert cli(["data", "info", str(tmp_path / "s")]) == 0
    text = out.getvalue()
    assert "prepared" in text and "300 documents" in text and "MB/s" in text
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli(["data", "info", str(tmp_path / "nothing")]) == 2
        assert cli(["data", "prepare", "--data", str(tmp_path / "none"), "--out",
                              str(tmp_path / "x")]) == 2
    assert err.getvalue().count("error:") == 2


def test_training_from_the_store_equals_training_from_the_source(tmp_path, tok_file):
    from pldr.training import TrainConfig, train

    folder = write_refinedweb(tmp_path / "rw", variations(160, seed=4))
    P.prepare_store(folder, tmp_path / "s", Tokenizer.load(tok_file), workers=2,
                    progress=False, **SMALL_SHARDS)
    small = PLDRConfig.preset("tiny").replace(num_layers=1, d_model=32, num_heads=2, dff=64,
                                              num_reslayerA=1, num_denseA=1, A_dff=16,
                                              max_seq_len=32)
    base = TrainConfig(model=small, out="", max_steps=4, batch_size=4, context_length=32,
                       warmup_steps=2, log_every=1, eval_every=2, eval_batches=2,
                       progress=False, tensorboard=False, cache_dir=str(tmp_path / "cache"),
                       device="cpu", chunk_mode="pad")
    with contextlib.redirect_stdout(io.StringIO()):
        src = train(base.replace(data=str(folder), tokenizer=str(tok_file),
                                 out=str(tmp_path / "run-src")))
        # no --tokenizer: the store's own is used
        st = train(base.replace(data=str(tmp_path / "s"), out=str(tmp_path / "run-store")))
    assert len(src.train_losses) == 4 and src.train_losses == st.train_losses
    val = [[r["loss"] for r in x.records if r["split"] == "val"] for x in (src, st)]
    assert len(val[0]) == 2 and val[0] == val[1]


def test_prepare_an_hf_dataset_folder_in_streaming_mode(tmp_path, tok):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    docs = variations(60, seed=5)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    store = P.prepare_store(f"hf:{folder}", tmp_path / "s", tok, split="train[:50]",
                            workers=2, progress=False, **SMALL_SHARDS).store
    assert store.num_documents == 50
    direct = load_tokens(f"hf:{folder}", tok, "train[:50]", use_cache=False, progress=False)
    assert np.array_equal(np.asarray(store.slice()[0]), direct.ids)


def test_cli_prepare_says_once_that_it_trains_a_tokenizer_and_not_when_it_does_not(tmp_path, corpus):
    folder, _ = corpus
    argv = ["data", "prepare", "--data", str(folder), "--out", str(tmp_path / "s"),
            "--vocab-size", "500", "--sample-docs", "100", "--no-progress"]
    for expected in (1, 0):  # the second run finds the store complete: no tokenizer to train
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli(argv) == 0
        lines = [line for line in out.getvalue().splitlines() if "training" in line]
        assert len(lines) == expected, out.getvalue()
    assert (tmp_path / "s" / "tokenizer.model").is_file()
