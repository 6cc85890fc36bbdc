"""Loading and saving models and G_LM files (pldr.checkpoint) and `pldr convert` / `info`.

The original's fixture checkpoints (tests/fixtures/original/) must load and reproduce the logits the
original computed; our directory format must round-trip exactly; files that want to run code
must be refused before anything runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pldr
from pldr import CheckpointError, PLDRConfig, PLDRModel, load_G_LM, load_model, save_G_LM
from pldr.checkpoint import inspect_checkpoint, load_G_LM_pairs, save_pretrained
from pldr.cli import main as cli_main
from conftest import reference_dir
from fixture_utils import assert_matches_fixture, expected, fixture_file, fixture_hpdict, inputs

CKPT = "checkpoint.pth"
G_CKPT = "v510G_identity_checkpoint.pth"
PREDEFINED = {
    "identity": "predefined_G_LM_cache_list_IDENTITY_5layer_14head_64x64_paper.pkl",
    "random": "predefined_G_LM_cache_list_RANDOM_NORMAL_5layer_14head_64x64_paper.pkl",
    "trained": "predefined_G_LM_cache_list_PLDRv51_110M_1_5layer_14head_64x64_paper.pkl",
    "pairs_identity": "Gcachelst_init_mismatched_identity_NAB1_ablation.pkl",
    "pairs_random": "Gcachelst_init_mismatched_random_normal_NAB2_ablation.pkl",
}


def _identity_G(config: PLDRConfig) -> list[torch.Tensor]:
    eye = torch.eye(config.dk).expand(1, config.num_heads, config.dk, config.dk)
    return [eye.clone() for _ in range(config.num_layers)]


def _logits(model: PLDRModel, name: str = "tokens") -> torch.Tensor:
    with torch.no_grad():
        return model(inputs()[name]).logits


def _fixture_state() -> dict:
    return torch.load(fixture_file(CKPT), weights_only=True)["model_state_dict"]


def _assert_all_real(model: PLDRModel, device: str = "cpu") -> None:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert not t.is_meta and t.device.type == device, f"{name} is on {t.device}"


# ----- loading the original's checkpoints -----------------------------------------------------

@pytest.mark.parametrize("form", ["hpdict", "json_path", "PLDRConfig"])
def test_fixture_checkpoint_loads_and_matches_the_original(form):
    config = {"hpdict": fixture_hpdict(), "json_path": str(fixture_file("config.json")),
              "PLDRConfig": PLDRConfig.from_hpdict(fixture_hpdict())}[form]
    model = load_model(fixture_file(CKPT), config)
    assert not model.training and model.config.variant == "v510"
    _assert_all_real(model)
    assert_matches_fixture(_logits(model), expected()["tokens/logits"], "logits")


def test_bare_state_dict_and_wrapper_prefixes_load(tmp_path):
    state = _fixture_state()
    want = _logits(load_model(fixture_file(CKPT), fixture_hpdict()))
    for prefix in ("", "module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / f"bare{prefix or '-'}.pt"
        torch.save({prefix + k: v for k, v in state.items()}, path)
        model = load_model(path, fixture_hpdict())
        assert torch.equal(_logits(model), want), prefix


def test_dtype_and_device_are_applied_and_rope_stays_float32():
    model = load_model(fixture_file(CKPT), fixture_hpdict(), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.rope_tables("cpu")[0].dtype == torch.float32
    fp32 = load_model(fixture_file(CKPT), fixture_hpdict(), dtype=torch.float32)
    assert fp32.dtype == torch.float32
    with pytest.raises(pldr.PLDRError, match="unknown dtype"):
        load_model(fixture_file(CKPT), fixture_hpdict(), dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(CheckpointError, match="not available"):
        load_model(fixture_file(CKPT), fixture_hpdict(), device="cuda")


def test_shapes_that_do_not_fit_the_config_name_the_first_key():
    with pytest.raises(CheckpointError) as e:
        load_model(fixture_file(CKPT), {**fixture_hpdict(), "input_vocab_size": 301})
    msg = str(e.value)
    assert "decoder.embedding.weight" in msg and "[300, 64]" in msg and "[301, 64]" in msg
    assert "config" in msg


def test_missing_and_unexpected_keys_are_named():
    with pytest.raises(CheckpointError, match=r"lacks .*decoder\.dec_layers\.2\."):
        load_model(fixture_file(CKPT), {**fixture_hpdict(), "num_layers": 3})
    with pytest.raises(CheckpointError, match=r"does not know: .*reslayerAs\.1\."):
        load_model(fixture_file(CKPT), {**fixture_hpdict(), "num_reslayerA": 1})


def test_missing_file_and_missing_config_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth", fixture_hpdict())
    with pytest.raises(CheckpointError, match="pass its config"):
        load_model(fixture_file(CKPT))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pt", fixture_hpdict())


# ----- v510G ----------------------------------------------------------------------------------

def _check_v510G_identity(model: PLDRModel) -> None:
    assert model.config.variant == "v510G"
    _assert_all_real(model)
    assert_matches_fixture(_logits(model), expected("v510G_identity_expected.pt")["tokens/logits"],
                           "logits", what="v510G logits")


def test_v510G_identity_checkpoint_loads_with_a_G_LM_list():
    config = PLDRConfig.from_hpdict(fixture_hpdict())  # says v510: the keys decide
    _check_v510G_identity(load_model(fixture_file(G_CKPT), config, G_LM=_identity_G(config)))


def test_v510G_identity_checkpoint_loads_with_G_LM_files(tmp_path):
    config = PLDRConfig.from_hpdict(fixture_hpdict())
    G = _identity_G(config)
    torch.save(torch.stack(G), tmp_path / "G.pt")                 # [L, 1, H, dk, dk]
    torch.save([g[0] for g in G], tmp_path / "G_list.pth")         # list of [H, dk, dk]
    save_G_LM(G, tmp_path / "G.safetensors")
    for name in ("G.pt", "G_list.pth", "G.safetensors"):
        _check_v510G_identity(load_model(fixture_file(G_CKPT), config, G_LM=tmp_path / name))


def test_v510G_without_G_LM_is_a_clear_error():
    with pytest.raises(CheckpointError, match="v510G checkpoint .*pass `G_LM`"):
        load_model(fixture_file(G_CKPT), fixture_hpdict())


def test_G_LM_for_a_v510_checkpoint_is_refused():
    config = PLDRConfig.from_hpdict(fixture_hpdict())
    with pytest.raises(CheckpointError, match="only for v510G"):
        load_model(fixture_file(CKPT), config, G_LM=_identity_G(config))


def test_G_LM_of_the_wrong_shape_is_refused():
    with pytest.raises(pldr.PLDRError, match=r"G_LM\[0\] has shape"):
        load_model(fixture_file(G_CKPT), fixture_hpdict(), G_LM=[torch.eye(8)[None]] * 2)


# ----- our directory format -------------------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path):
    model = load_model(fixture_file(CKPT), fixture_hpdict())
    out = tmp_path / "model"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "pldr_llm"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = load_model(out)
    assert loaded.config == model.config and not loaded.training
    _assert_all_real(loaded)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(_logits(loaded), _logits(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_save_pretrained_replaces_an_old_model_and_keeps_other_files(tmp_path):
    model = load_model(fixture_file(CKPT), fixture_hpdict())
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")
    save_pretrained(model, out)
    assert torch.equal(_logits(load_model(out)), _logits(model))
    (out / "notes.txt").write_text("keep me")
    save_pretrained(model, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert torch.equal(_logits(load_model(out)), _logits(model))


def test_v510G_G_LM_survives_the_round_trip(tmp_path):
    config = PLDRConfig.from_hpdict(fixture_hpdict()).replace(variant="v510G")
    torch.manual_seed(0)
    G = torch.randn(config.num_layers, config.num_heads, config.dk, config.dk)
    model = PLDRModel(config, G_LM=G).eval()
    model.save_pretrained(tmp_path / "g")
    loaded = load_model(tmp_path / "g")  # no G_LM needed: it is saved with the model
    for i in range(config.num_layers):
        assert torch.equal(loaded.decoder.dec_layers[i].mha1.G_LM, G[i])
    assert torch.equal(_logits(loaded), _logits(model))
    # a G_LM given at load time replaces the saved one
    eye = load_model(tmp_path / "g", G_LM=_identity_G(config))
    assert torch.equal(eye.decoder.dec_layers[0].mha1.G_LM, torch.eye(config.dk).expand_as(G[0]))


def test_config_given_for_a_directory_overrides_its_config_json(tmp_path):
    model = load_model(fixture_file(CKPT), fixture_hpdict())
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", model.config.replace(metric_includes_pad=True))
    assert loaded.config.metric_includes_pad


def test_tokenizer_file_is_copied(tmp_path):
    from pldr.data.tokenizer import Tokenizer

    src = tmp_path / "t.model"  # fewer pieces than the fixture's 300 ids
    Tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 50, 290).save(src)
    model = load_model(fixture_file(CKPT), fixture_hpdict())
    save_pretrained(model, tmp_path / "m", tokenizer=src)
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == src.read_bytes()
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"spm bytes")
    with pytest.raises(CheckpointError, match="not a SentencePiece"):
        save_pretrained(model, tmp_path / "m3", tokenizer=junk)
    assert not (tmp_path / "m3").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        save_pretrained(model, tmp_path / "m2", tokenizer=tmp_path / "missing.model")


# ----- safe loading ---------------------------------------------------------------------------

class _Evil:
    """Unpickling this runs a shell command: it must never happen."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_code_running_pickles_are_refused(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / ("evil.pkl" if writer == "pickle" else "evil.pt")
    payload = {"model_state_dict": _Evil(marker)} if writer == "torch.save" else [_Evil(marker)]
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=5))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        load_G_LM(path)
    assert "system" in str(e.value)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path, fixture_hpdict())
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(fixture_file(G_CKPT), fixture_hpdict(), G_LM=path)
    assert not marker.exists()


# ----- G_LM files -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(PREDEFINED))
def test_predefined_G_LM_files_load_on_cpu(key):
    path = reference_dir("predefined_G_LM", PREDEFINED[key])
    G = load_G_LM(path)
    assert len(G) == 5
    for g in G:
        assert g.shape == (1, 14, 64, 64) and g.dtype == torch.float32 and g.device.type == "cpu"
    eye = torch.eye(64).expand(1, 14, 64, 64)
    if key in ("identity", "pairs_identity"):
        assert all(torch.equal(g, eye) for g in G)
    if key in ("random", "pairs_random"):
        assert all(0 <= g.min() and g.max() < 1 for g in G) and not torch.equal(G[0], G[1])
    A_LM, G2 = load_G_LM_pairs(path)
    assert all(torch.equal(a, b) for a, b in zip(G, G2))
    if key.startswith("pairs"):  # [A_LM, G_LM] pairs: G_LM is the second, A_LM all zeros
        assert len(A_LM) == 5 and all(a.shape == (1, 14, 64, 64) and not a.any() for a in A_LM)
    else:
        assert A_LM is None


def test_save_G_LM_round_trip_with_A_LM(tmp_path):
    G = [torch.randn(1, 3, 8, 8) for _ in range(2)]
    A = [torch.rand(3, 8, 8) for _ in range(2)]
    save_G_LM(G, tmp_path / "g.safetensors", A_LM=A)
    with safe_open(tmp_path / "g.safetensors", framework="pt") as f:
        assert set(f.keys()) == {"G_LM", "A_LM"} and f.get_tensor("G_LM").shape == (2, 3, 8, 8)
        assert f.metadata()["content"] == "pldr.G_LM"
    A2, G2 = load_G_LM_pairs(tmp_path / "g.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(G2, G))
    assert all(g.shape == (1, 3, 8, 8) for g in G2)
    assert all(torch.equal(a[0], b) for a, b in zip(A2, A))
    with pytest.raises(CheckpointError, match="safetensors"):
        save_G_LM(G, tmp_path / "g.pt")


def test_G_LM_files_that_are_not_G_LM_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_G_LM(tmp_path / "none.pkl")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="no 'G_LM' entry"):
        load_G_LM(tmp_path / "w.pt")
    torch.save([torch.zeros(3, 8, 4)], tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"needs \[H, dk, dk\] or \[1, H, dk, dk\]"):
        load_G_LM(tmp_path / "bad.pt")
    torch.save([torch.zeros(3, 4, 4), torch.zeros(3, 8, 8)], tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"G_LM\[1\] has shape \[3, 8, 8\] but needs \[3, 4, 4\] like G_LM\[0\]"):
        load_G_LM(tmp_path / "mixed.pt")


# ----- command line ---------------------------------------------------------------------------

def test_cli_convert_end_to_end(tmp_path, capsys):
    out = tmp_path / "converted"
    rc = cli_main(["convert", str(fixture_file(CKPT)),
                   "--config", str(fixture_file("config.json")), "--out", str(out)])
    assert rc == 0 and "162,068 parameters" in capsys.readouterr().out
    model = load_model(out)
    assert_matches_fixture(_logits(model), expected()["tokens/logits"], "logits",
                           what="converted logits")
    original = _fixture_state()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_cli_convert_v510G_with_a_G_LM_file_and_bfloat16(tmp_path, capsys):
    config = PLDRConfig.from_hpdict(fixture_hpdict())
    save_G_LM(_identity_G(config), tmp_path / "eye.safetensors")
    out = tmp_path / "g"
    rc = cli_main(["convert", str(fixture_file(G_CKPT)), "--config",
                   str(fixture_file("config.json")), "--G-LM", str(tmp_path / "eye.safetensors"),
                   "--out", str(out), "--dtype", "bfloat16"])
    assert rc == 0, capsys.readouterr().err
    model = load_model(out)
    assert model.config.variant == "v510G" and model.dtype == torch.bfloat16


def test_cli_info(tmp_path, capsys):
    assert cli_main(["info", str(fixture_file(G_CKPT)), "--config",
                     str(fixture_file("config.json")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "v510G" and info["num_tensors"] == 41
    assert info["config"]["vocab_size"] == 300
    direct = inspect_checkpoint(fixture_file(G_CKPT), fixture_hpdict())
    assert info["num_parameters"] == direct["num_parameters"] == 138_708
    assert cli_main(["info", str(fixture_file(CKPT)), "--config",
                     str(fixture_file("config.json"))]) == 0
    assert "v510, 162,068 parameters" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["convert", "missing.pth", "--config", "CONFIG", "--out", "OUT"],
    ["convert", "G_CKPT", "--config", "CONFIG", "--out", "OUT"],  # no --G-LM
    ["convert", "CKPT", "--out", "OUT"],  # --config is required
    ["convert", "CKPT", "--config", "CONFIG", "--out", "OUT", "--dtype", "int8"],
    ["info", "CKPT"],  # an original checkpoint needs --config
])
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, capsys, argv):
    names = {"CKPT": str(fixture_file(CKPT)), "G_CKPT": str(fixture_file(G_CKPT)),
             "CONFIG": str(fixture_file("config.json")), "OUT": str(tmp_path / "out"),
             "missing.pth": str(tmp_path / "missing.pth")}
    try:
        rc = cli_main([names.get(a, a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "out").exists()
