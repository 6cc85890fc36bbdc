"""The port's task heads: its sequence classifier (tests/fixtures/hfport/small_seqcls, a copy
of ../shared/reference/hfport/small_seqcls; tolerances in its README) loads with `load_model`
and computes what the port computed, and `pldr convert` writes every head back in the port's
layout and ours bit for bit."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pldr
from pldr import CheckpointError, load_model
from pldr.checkpoint.convert import convert_model
from pldr.cli import main as cli_main
from fixture_utils import assert_close_scaled

SEQCLS = Path(__file__).parents[1] / "fixtures" / "hfport" / "small_seqcls"
# the fixture README: float32 against the port 1e-4 relative to max(1, largest magnitude),
# float64 within 1e-8; pooling index and predicted labels exact
F32_TOL, F64_TOL = 1e-4, 1e-8


@lru_cache(maxsize=None)
def expected() -> dict:
    return torch.load(SEQCLS / "expected.pt", weights_only=True)


def _port_config() -> dict:
    return json.loads((SEQCLS / "config.json").read_text())


def _same_file_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same keys with byte-identical tensors."""
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys(), sa.keys() ^ sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert sa[k].numpy().tobytes() == sb[k].numpy().tobytes(), k


# ----- the port's sequence classifier -------------------------------------------------------------

def test_the_ports_sequence_classifier_loads_as_ours():
    model = load_model(SEQCLS)
    assert type(model) is pldr.PLDRForSequenceClassification and not model.training
    c = model.config
    assert (c.num_labels, c.id2label, c.label2id) == (3, {0: "neg", 1: "neu", 2: "pos"},
                                                      {"neg": 0, "neu": 1, "pos": 2})
    assert c.pad_id == 0 and not c.metric_includes_pad and c.problem_type is None
    assert len(model.state_dict()) == 110 and model.score.bias is None


@pytest.mark.parity
def test_unpadded_logits_match_the_port():
    e = expected()
    out = load_model(SEQCLS)(e["input_ids"])
    assert out.pool_index.tolist() == [10, 10]
    assert_close_scaled(out.logits.detach(), e["logits"], F32_TOL, "logits")
    assert out.logits.argmax(-1).tolist() == e["logits"].argmax(-1).tolist() == [0, 2]


@pytest.mark.parity
@pytest.mark.parametrize("metric_includes_pad, key", [
    (False, "padded_logits_pads_excluded_from_A"), (True, "padded_logits")])
def test_padded_batch_matches_the_port_in_both_metric_settings(metric_includes_pad, key):
    e = expected()
    config = load_model(SEQCLS).config.replace(metric_includes_pad=metric_includes_pad)
    model = load_model(SEQCLS, config)
    ids, mask = e["padded_input_ids"], e["padded_attention_mask"]
    for out in (model(ids, mask), model(ids)):  # from the mask, or from the pad id
        assert out.pool_index.tolist() == e["padded_pool_index"].tolist() == [10, 6]
        assert_close_scaled(out.logits.detach(), e[key], F32_TOL, key)
        assert out.logits.argmax(-1).tolist() == e[key].argmax(-1).tolist()


def test_our_default_padded_row_equals_the_row_alone_and_the_ports_does_not():
    e = expected()
    model = load_model(SEQCLS).double()
    ids, mask = e["padded_input_ids"], e["padded_attention_mask"]
    alone = model(e["input_ids"][1:, :7]).logits[0]
    torch.testing.assert_close(model(ids, mask).logits[1], alone, rtol=0, atol=1e-10)
    assert (e["padded_logits"][1].double() - alone).abs().max() > 0.1  # pads in A move it


@pytest.mark.parity
def test_float64_logits_match_the_ports_float64_run():
    e = expected()
    model = load_model(SEQCLS).double()
    assert_close_scaled(model(e["input_ids"]).logits.detach(), e["logits_float64"], F64_TOL)
    with_pads = load_model(SEQCLS, model.config.replace(metric_includes_pad=True)).double()
    got = with_pads(e["padded_input_ids"], e["padded_attention_mask"]).logits.detach()
    assert_close_scaled(got, e["padded_logits_float64"], F64_TOL, "padded, pads in A")


# ----- conversions ----------------------------------------------------------------------------------

def test_port_head_round_trips_bit_exactly_through_both_layouts(tmp_path):
    model = load_model(SEQCLS)
    port = convert_model(model, tmp_path / "port", "hf-port")
    _same_file_tensors(SEQCLS / "model.safetensors", port / "model.safetensors")
    written, want = json.loads((port / "config.json").read_text()), _port_config()
    changed = {k for k in want if written.get(k) != want[k]} - {"transformers_version"}
    assert not changed, {k: (want[k], written.get(k)) for k in changed}
    assert not (port / "generation_config.json").exists()  # the port saves none with a head
    ours = convert_model(model, tmp_path / "ours", "pldr")
    back = convert_model(load_model(ours), tmp_path / "again", "hf-port")
    _same_file_tensors(SEQCLS / "model.safetensors", back / "model.safetensors")
    assert json.loads((back / "config.json").read_text()) == written
    assert load_model(ours).config == model.config


@pytest.mark.parametrize("cls", [pldr.PLDRForTokenClassification, pldr.PLDRForQuestionAnswering,
                                 pldr.PLDRForSequenceClassification])
def test_each_head_round_trips_through_the_ports_layout(tmp_path, cls):
    torch.manual_seed(0)
    config = load_model(SEQCLS).config.replace(
        problem_type=None if cls is pldr.PLDRForQuestionAnswering else "multi_label_classification",
        classifier_dropout=0.25, rope_style="half")
    model = cls(config).eval()
    model.save_pretrained(tmp_path / "ours")
    port = convert_model(load_model(tmp_path / "ours"), tmp_path / "port", "hf-port")
    written = json.loads((port / "config.json").read_text())
    assert written["architectures"] == [cls.port_architecture]
    assert written["reference_rope"] is False and written["classifier_dropout"] == 0.25
    again = convert_model(load_model(port), tmp_path / "again", "pldr")
    _same_file_tensors(tmp_path / "ours" / "model.safetensors", again / "model.safetensors")
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (tmp_path / "ours" / "config.json").read_text())
    back = load_model(again)
    assert type(back) is cls and back.config == config


def test_cli_converts_a_head_and_refuses_the_original_layout(tmp_path, capsys):
    assert cli_main(["convert", str(SEQCLS), "--out", str(tmp_path / "ours")]) == 0
    assert "(pldr layout, sequence-classification, v510," in capsys.readouterr().out
    rc = cli_main(["convert", str(tmp_path / "ours"), "--out", str(tmp_path / "orig"),
                   "--to", "original"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "original release has no task heads" in err[0]
    assert not (tmp_path / "orig").exists()


def test_info_names_the_head(capsys):
    from pldr.checkpoint.load import inspect_checkpoint

    info = inspect_checkpoint(SEQCLS)
    assert info["task"] == "sequence-classification" and info["num_tensors"] == 110
    assert info["config"]["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert cli_main(["info", str(SEQCLS)]) == 0
    assert ": sequence-classification, v510, " in capsys.readouterr().out


def test_a_head_checkpoint_whose_architecture_lies_is_a_one_line_error(tmp_path):
    import shutil

    d = tmp_path / "tc"
    shutil.copytree(SEQCLS, d)
    (d / "config.json").write_text(json.dumps(
        {**_port_config(), "architectures": ["PldrllmForTokenClassification"]}))
    with pytest.raises(CheckpointError, match="lacks 1 key.*score.bias"):
        load_model(d)
