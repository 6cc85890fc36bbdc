"""pldr.files: atomic writes leave the old file or the new one, and no temporary files."""

import os

import pytest

from pldr import files
from pldr.data.tokenizer import Tokenizer


def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    files.atomic_write_text(target, "one")
    files.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_temporary_names_are_unique_and_recognised(tmp_path):
    a, b = files.temp_sibling(tmp_path / "x"), files.temp_sibling(tmp_path / "x", "old")
    assert a != b and files.is_temp_name(a.name) and files.is_temp_name(b.name)
    assert not files.is_temp_name("step-00000001") and not files.is_temp_name(".tmp-step-1")


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    new, dst = tmp_path / "new", tmp_path / "dst"
    new.mkdir()
    (new / "f").write_text("new")
    files.replace_dir(new, dst)  # no folder there yet
    assert (dst / "f").read_text() == "new" and not new.exists()
    new.mkdir()
    (new / "f").write_text("newer")
    files.replace_dir(new, dst)
    assert (dst / "f").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_replace_dir_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    new, dst = tmp_path / "new", tmp_path / "dst"
    for d, text in ((new, "new"), (dst, "old")):
        d.mkdir()
        (d / "f").write_text(text)
    real = os.replace

    def failing(src, target):
        if os.fspath(src) == os.fspath(new):
            raise OSError("rename refused")
        return real(src, target)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="rename refused"):
        files.replace_dir(new, dst)
    assert (dst / "f").read_text() == "old" and (new / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "new"]


def test_tokenizer_find_names_the_file_load_reads(tmp_path):
    assert Tokenizer.find(tmp_path) is None and Tokenizer.find(tmp_path / "none.model") is None
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    assert Tokenizer.find(tmp_path) == tmp_path / "tokenizer.model"
    assert Tokenizer.find(tmp_path / "tokenizer.model") == tmp_path / "tokenizer.model"


@pytest.fixture
def umask_027():
    """A umask under which a default file is rw-r----- (0640) and a folder rwxr-x--- (0750)."""
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_every_file_pldr_writes_gets_0666_less_the_umask(tmp_path, umask_027):
    import stat

    import torch

    from pldr import PLDRConfig, PLDRModel, save_G_LM
    from pldr.checkpoint.convert import convert_model
    from pldr.checkpoint.glm import save_G_LM_original
    from pldr.data import load_documents

    cfg = PLDRConfig(num_layers=1, d_model=32, num_heads=2, dff=48, num_reslayerA=1,
                     num_denseA=1, A_dff=24, vocab_size=400, max_seq_len=16)
    tok = Tokenizer.train(load_documents("builtin")[:40], 400, str(tmp_path / "tok"))
    model = PLDRModel(cfg)
    model.save_pretrained(tmp_path / "ours", tokenizer=tok)
    for layout in ("hf-port", "original"):
        convert_model(model, tmp_path / layout, layout, tokenizer=tok)
    G = torch.rand(1, 2, 16, 16)
    save_G_LM(G, tmp_path / "g" / "G.safetensors")
    save_G_LM_original(G, tmp_path / "g" / "G.pkl")
    written = [p for p in tmp_path.rglob("*")]
    assert {"model.safetensors", "checkpoint.pth", "G.safetensors", "G.pkl",
            "tokenizer.model"} <= {p.name for p in written}
    for p in written:
        want = 0o750 if p.is_dir() else 0o640
        assert stat.S_IMODE(p.stat().st_mode) == want, f"{p.relative_to(tmp_path)}: {oct(p.stat().st_mode)}"
