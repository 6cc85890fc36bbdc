"""The transformers port's layout (pldr.checkpoint.hf_port), conversions between the three
layouts (pldr.checkpoint.convert, `pldr convert --to`), and the port's fixture
(tests/fixtures/hfport/small, tolerances in its README)."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import pldr
from pldr import CheckpointError, load_model
from pldr.checkpoint.convert import convert_model, permute_rope_style
from pldr.checkpoint.hf_port import config_from_port, config_to_port
from pldr.cli import main as cli_main
from fixture_utils import HFPORT_TOL, assert_matches_fixture, assert_same

PORT = Path(__file__).parents[1] / "fixtures" / "hfport" / "small"


@lru_cache(maxsize=None)
def port_expected() -> dict:
    return torch.load(PORT / "expected.pt", weights_only=True)


def _match(got, kind, want=None, what=""):
    """Compare with the port's `expected.pt[kind]` (or `want`) at the README's bound."""
    want = port_expected()[kind] if want is None else want
    assert_matches_fixture(got, want, kind, what=what or kind, tolerances=HFPORT_TOL)


def _same_weights(a: pldr.PLDRModel, b: pldr.PLDRModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ----- the port's fixture --------------------------------------------------------------------

def test_port_config_maps_onto_ours():
    model = load_model(PORT)
    assert model.config == pldr.PLDRConfig(
        num_layers=2, d_model=64, num_heads=4, dff=170, num_reslayerA=2, num_denseA=2,
        A_dff=32, vocab_size=300, max_seq_len=256)  # interleaved RoPE, pads out of A


@pytest.mark.parametrize("kind", ["logits", "A", "A_LM", "A_P", "G_LM"])
def test_port_fixture_logits_and_deductive_outputs(kind):
    out = load_model(PORT)(port_expected()["input_ids"], return_deductive=True)
    got = out.logits if kind == "logits" else getattr(out.deductive, kind)
    _match(got.detach(), kind)


def test_port_fixture_float64_logits():
    model = load_model(PORT).double()
    _match(model(port_expected()["input_ids"]).logits.detach(), "logits_float64")


@pytest.mark.parity
def test_port_fixture_padded_batch_and_the_padding_difference():
    e = port_expected()
    ids, real = e["padded_input_ids"], e["padded_attention_mask"].bool()
    assert bool(real[0].all()) and not bool(real[1, :3].any())
    ours = load_model(PORT)
    with_pads = load_model(PORT, ours.config.replace(metric_includes_pad=True))
    for model in (ours, with_pads):  # row 0 has no pads: both settings equal the port
        _match(model(ids).logits[0].detach(), "logits", e["padded_logits"][0],
               what="padded batch, row 0")
    # row 1: the port's left-padded row differs from the same tokens alone (its padding
    # defect, inherited from the original); ours equals the row alone
    alone = ours(ids[1:, 3:]).logits[0].detach()
    assert (e["padded_logits"][1, 3:] - alone).abs().max() > 0.1
    assert_same(ours(ids).logits[1, 3:].detach(), alone, "left-padded row")


@pytest.mark.parametrize("cache, key", [("kv_g", "use_cache"), ("no_cache", "no_cache")])
def test_port_fixture_greedy_streams(cache, key):
    e = port_expected()
    model = load_model(PORT)
    new = pldr.generate(model, e["prompt_ids"], 16, cache=cache, temperature=0, eos_id=-1)
    want = e[f"greedy_ids_{key}"][0]
    assert new[0] == want[6:].tolist()
    if cache == "no_cache":  # each step is a plain forward of the sequence so far
        steps = torch.stack([model(want[None, :6 + i]).logits[0, -1].detach() for i in range(16)])
        _match(steps, "logits", e["greedy_step_logits_no_cache"], what="no_cache steps")


# ----- config mapping and refusals -------------------------------------------------------------

def _port_dict() -> dict:
    return json.loads((PORT / "config.json").read_text())


def test_reference_rope_false_is_rotate_half_and_custom_G_type_is_v510G():
    c = config_from_port({**_port_dict(), "reference_rope": False})
    assert c.rope_style == "half" and c.variant == "v510"
    assert config_from_port({**_port_dict(), "custom_G_type": "identity"}).variant == "v510G"
    c = load_model(PORT).config
    assert config_from_port(config_to_port(c, torch.float32)) == c


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": False}, "attention_bias=False cannot be represented"),
    ({"glu_bias": False}, "glu_bias=False"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling"),
    ({"hidden_size": 96}, "hidden_size=96 is not num_attention_heads"),
])
def test_what_we_cannot_represent_is_refused(tmp_path, change, message):
    d = tmp_path / "port"
    shutil.copytree(PORT, d)
    (d / "config.json").write_text(json.dumps({**_port_dict(), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_a_directory_in_neither_layout_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither model layout"):
        load_model(tmp_path / "empty")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(other)
    rc = cli_main(["convert", str(other), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "neither model layout" in err[0]


# ----- conversions -------------------------------------------------------------------------------

def _v52_model() -> pldr.PLDRModel:
    """A rotate-half (v52-style) model: the fixture's weights with rope_style="half"."""
    model = load_model(PORT)
    half = pldr.PLDRModel(model.config.replace(rope_style="half"))
    half.load_state_dict(model.state_dict())
    return half.eval()


def _v51G_model() -> pldr.PLDRModel:
    model = load_model(PORT)
    return pldr.to_v510G(model, pldr.infer_G_LM(model, port_expected()["input_ids"])).eval()


def _read(path: Path, layout: str) -> pldr.PLDRModel:
    if layout == "original":
        G = path / "G_LM.pkl"
        return load_model(path / "checkpoint.pth", path / "hpdict.json",
                          G_LM=G if G.exists() else None)
    return load_model(path)


@pytest.mark.parametrize("make", [lambda: load_model(PORT), _v52_model, _v51G_model],
                         ids=["v51", "v52", "v51G"])
@pytest.mark.parametrize("layout", ["pldr", "hf-port", "original"])
def test_conversions_round_trip_bit_exactly_and_keep_the_logits(tmp_path, make, layout):
    model = make()
    back = _read(convert_model(model, tmp_path / layout, layout), layout)
    ids = port_expected()["input_ids"]
    if layout == "original" and model.config.rope_style == "half":
        # the original has interleaved RoPE only: the exact permuted twin comes back
        assert back.config == model.config.replace(rope_style="interleaved")
        twin, _ = permute_rope_style(model.state_dict(), model.config, "interleaved")
        assert all(torch.equal(twin[k], v) for k, v in back.state_dict().items())
        again, cfg = permute_rope_style(back.state_dict(), back.config, "half")
        assert cfg == model.config
        assert all(torch.equal(model.state_dict()[k], v) for k, v in again.items())
        assert_same(back.double()(ids).logits, model.double()(ids).logits, "twin logits")
        return
    assert back.config == model.config and _same_weights(back, model)
    assert torch.equal(back(ids).logits, model(ids).logits)


def test_port_directory_written_by_us_has_the_ports_layout(tmp_path):
    out = convert_model(_v51G_model(), tmp_path / "g", "hf-port")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pldrllm" and config["custom_G_type"] == "external"
    assert config["architectures"] == ["PldrllmForCausalLM"]
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    assert state["decoder.past_G_values"].shape == (2, 3, 1, 4, 16, 16)
    assert state["decoder.past_G_values_status"].dtype == torch.bool
    assert not state["decoder.past_G_values"][:, :2].any()
    assert not any(k.endswith("mha1.G_LM") for k in state)
    port_keys = set(json.loads((PORT / "config.json").read_text())) - {"transformers_version"}
    assert port_keys <= set(config), port_keys - set(config)


def test_cli_convert_to_each_layout_and_back(tmp_path, capsys):
    port = tmp_path / "port"
    assert cli_main(["convert", str(PORT), "--out", str(tmp_path / "ours")]) == 0
    assert cli_main(["convert", str(tmp_path / "ours"), "--out", str(port),
                     "--to", "hf-port"]) == 0
    assert cli_main(["convert", str(port), "--out", str(tmp_path / "orig"),
                     "--to", "original"]) == 0
    assert cli_main(["convert", str(tmp_path / "orig" / "checkpoint.pth"), "--config",
                     str(tmp_path / "orig" / "hpdict.json"), "--out", str(tmp_path / "again")]) == 0
    assert "original layout, v510, 162,068 parameters" in capsys.readouterr().out
    assert _same_weights(load_model(tmp_path / "again"), load_model(PORT))
    assert json.loads((tmp_path / "orig" / "hpdict.json").read_text())["input_vocab_size"] == 300


def test_converting_onto_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds other files"):
        convert_model(load_model(PORT), tmp_path / "busy", "hf-port")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_a_conversion_carries_the_sources_tokenizer(tmp_path, capsys):
    """`pldr convert` keeps the tokenizer of a source that has one, to either layout; the port
    directory loads with AutoTokenizer (import pldr.hf) as our own does, and the converted
    models take text prompts in `pldr generate` and in the server's tokenizer look-up."""
    import argparse

    from pydoc_data.topics import topics

    from pldr.cli.common import load_tokenizer_arg
    from pldr.data.tokenizer import Tokenizer

    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:40]], 400, str(tmp_path / "tok"))
    torch.manual_seed(0)
    pldr.PLDRModel(pldr.PLDRConfig.preset("tiny").replace(vocab_size=400, num_layers=1)
                   ).save_pretrained(tmp_path / "ours", tokenizer=tok)
    port, back = tmp_path / "port", tmp_path / "back"
    assert cli_main(["convert", str(tmp_path / "ours"), "--out", str(port), "--to", "hf-port"]) == 0
    assert cli_main(["convert", str(port), "--out", str(back)]) == 0
    assert capsys.readouterr().out.count("with its tokenizer") == 2
    for d in (port, back):
        assert (d / "tokenizer.model").read_bytes() == tok.model_proto
        found = load_tokenizer_arg(argparse.Namespace(model=str(d), tokenizer=None), "pldr serve")
        assert found.model_proto == tok.model_proto
        assert cli_main(["generate", "--model", str(d), "--prompt", "The class",
                         "--max-new-tokens", "2", "--seed", "0", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["prompt_ids"] == tok.encode("The class",
                                                                                  eos=False)
    import transformers

    from pldr import hf  # noqa: F401  importing registers PLDRTokenizer

    for d in (tmp_path / "ours", port, back):
        hf_tok = transformers.AutoTokenizer.from_pretrained(d)
        assert type(hf_tok).__name__ == "PLDRTokenizer"
        assert hf_tok("The class")["input_ids"] == tok.encode("The class", eos=False)
        assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (0, 3)
