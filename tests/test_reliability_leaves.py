"""Bad values are refused where they enter (config, devices, G_LM files, text), and files
pldr writes are complete, checked on load and readable like their neighbours."""

import json
import os
import pickle
import stat

import pytest
import torch

from pldr import CheckpointError, ConfigError, PLDRConfig, PLDRError, PLDRModel, load_G_LM, load_model
from pldr.data.tokenizer import Tokenizer
from pldr.devices import resolve_device
from pldr.files import replace_dir

TINY = PLDRConfig.preset("tiny")


@pytest.mark.parametrize("field, value, message", [
    ("rope_base", float("nan"), "rope_base"),
    ("rope_base", 0.0, "rope_base"),
    ("rope_base", -5.0, "rope_base"),
    ("rope_base", float("inf"), "rope_base"),
    ("rope_base", 1.0, "rope_base"),
    ("layernorm_eps", float("nan"), "layernorm_eps"),
    ("layernorm_eps", 0.0, "layernorm_eps"),
    ("layernorm_eps", -1e-6, "layernorm_eps"),
    ("layernorm_eps", float("inf"), "layernorm_eps"),
    ("max_seq_len", 10**12, "beyond any sane model"),
    ("d_model", 1 << 20, "beyond any sane model"),
    ("vocab_size", 10**9, "beyond any sane model"),
    ("num_layers", 100000, "beyond any sane model"),
])
def test_config_refuses_non_finite_and_absurd_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**{field: value})


def test_config_still_takes_sane_values():
    cfg = TINY.replace(rope_base=500000.0, layernorm_eps=1e-5, max_seq_len=8192)
    assert cfg.rope_base == 500000.0 and cfg.max_seq_len == 8192


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cuda:7"])
def test_devices_torch_knows_but_this_machine_lacks_are_one_line_errors(device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.fail("this test assumes fewer than 8 GPUs")
    with pytest.raises(PLDRError, match="not supported|not available|does not exist"):
        resolve_device(device)


def test_load_model_refuses_the_meta_device(tmp_path):
    PLDRModel(TINY.replace(num_layers=1)).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not supported"):
        load_model(tmp_path / "m", device="meta")


def test_a_non_finite_G_LM_file_is_refused(tmp_path):
    G = [torch.eye(4).expand(1, 2, 4, 4).clone() for _ in range(2)]
    G[1][0, 0, 0, 0] = float("nan")
    path = tmp_path / "g.pt"
    torch.save(G, path)
    with pytest.raises(CheckpointError, match="layer 1 holds NaN"):
        load_G_LM(path)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_G_LM(tmp_path)


def test_text_that_is_not_utf8_is_a_clear_error(tmp_path):
    from pydoc_data.topics import topics

    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:30]], 400, str(tmp_path / "t"))
    bad = b"caf\xff".decode("utf-8", "surrogateescape")  # how a bad argv byte arrives
    with pytest.raises(PLDRError, match="not valid UTF-8"):
        tok.encode(bad)
    with pytest.raises(PLDRError, match="not valid UTF-8"):
        tok.encode_batch(["fine", bad])


# ----- model directories: manifest, modes, links ----------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = PLDRModel(TINY.replace(num_layers=1))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_model_files_carry_a_manifest_and_the_default_mode(saved):
    model, d = saved
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["bytes"] == (d / "model.safetensors").stat().st_size
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "model.safetensors", "manifest.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o666 & ~mask, name
    ids = torch.randint(6, TINY.vocab_size, (1, 8))
    assert torch.equal(load_model(d)(ids).logits, model.eval()(ids).logits)


def test_a_truncated_weights_file_is_named_before_loading(saved):
    _, d = saved
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or altered"):
        load_model(d)


def test_an_altered_weights_file_is_named_before_loading(saved):
    _, d = saved
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its saved checksum"):
        load_model(d)


def test_a_broken_manifest_is_named(saved):
    _, d = saved
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a pldr manifest"):
        load_model(d)


def test_a_directory_without_manifest_still_loads(saved):
    model, d = saved
    (d / "manifest.json").unlink()
    assert load_model(d).num_parameters() == model.num_parameters()


def test_replacing_a_directory_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    new = tmp_path / "new"
    new.mkdir()
    (new / "fresh.txt").write_text("new")
    replace_dir(new, link)
    assert link.is_symlink() and (link / "fresh.txt").read_text() == "new"
    assert not (real / "old.txt").exists()


def test_no_pickle_payload_runs_when_a_G_LM_file_is_read(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(CheckpointError):
        load_G_LM(path)
    assert not marker.exists()
