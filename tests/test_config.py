import json

import pytest

from pldr import ConfigError, PLDRConfig
from fixture_utils import fixture_hpdict


def test_hpdict_round_trip():
    hp = fixture_hpdict()
    cfg = PLDRConfig.from_hpdict(hp)
    assert cfg.vocab_size == 300 and cfg.dk == 16 and cfg.variant == "v510"
    back = cfg.to_hpdict()
    for key in ("num_layers", "d_model", "num_heads", "dff", "num_reslayerA", "num_denseA",
                "A_dff", "input_vocab_size", "max_seq_len"):
        assert back[key] == hp[key]
    assert PLDRConfig.from_hpdict(back) == cfg


def test_training_keys_of_the_original_are_ignored():
    hp = PLDRConfig.preset("pldr-110m").to_hpdict()
    hp.update(epochs=1, learning_rate=1e-3, warmup_steps=2000, fsdp_sharding_strategy="FULL_SHARD",
              save_type="torch", device="cuda", activation="silu")
    assert PLDRConfig.from_hpdict(hp) == PLDRConfig.preset("pldr-110m")


def test_json_round_trip(tmp_path):
    cfg = PLDRConfig.preset("tiny").replace(metric_includes_pad=True, variant="v510G")
    cfg.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "pldr_llm"
    assert PLDRConfig.from_json(tmp_path / "config.json") == cfg
    assert PLDRConfig.from_json(tmp_path) == cfg  # a directory holding config.json
    (tmp_path / "hp.json").write_text(json.dumps(fixture_hpdict()))
    assert PLDRConfig.from_json(tmp_path / "hp.json") == PLDRConfig.from_hpdict(fixture_hpdict())


@pytest.mark.parametrize("change, message", [
    ({"num_layerz": 2}, "unknown key"),
    ({"num_layers": "2"}, "must be an integer"),
    ({"num_layers": 2.0}, "must be an integer"),
    ({"d_model": 65}, "divisible"),
    ({"num_heads": 0}, "must be > 0"),
])
def test_bad_hpdict_is_a_clear_error(change, message):
    hp = fixture_hpdict() | change
    with pytest.raises(ConfigError, match=message):
        PLDRConfig.from_hpdict(hp)


def test_missing_hpdict_key_is_named():
    hp = fixture_hpdict()
    del hp["A_dff"]
    with pytest.raises(ConfigError, match="A_dff"):
        PLDRConfig.from_hpdict(hp)


def test_presets():
    assert PLDRConfig.preset("pldr-110m").num_parameters() == 109_689_362
    assert PLDRConfig.preset("pldr-110m-G").num_parameters() == 105_606_482
    assert PLDRConfig.preset("pldr-110m-G").variant == "v510G"
    assert PLDRConfig.preset("tiny").num_layers >= 1
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        PLDRConfig.preset("huge")


def test_config_is_frozen():
    cfg = PLDRConfig.preset("tiny")
    with pytest.raises(AttributeError):
        cfg.num_layers = 3  # type: ignore[misc]


def test_bad_json_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PLDRConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "weights.pth").write_bytes(b"PK\x03\x04\x80\xff binary")
    with pytest.raises(ConfigError, match="not a text file"):
        PLDRConfig.from_json(tmp_path / "weights.pth")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PLDRConfig.from_json(tmp_path / "bad.json")


def test_resolve_takes_every_form_of_a_config(tmp_path):
    tiny = PLDRConfig.preset("tiny")
    hp = fixture_hpdict()
    tiny.to_json(tmp_path / "config.json")
    assert PLDRConfig.resolve(tiny) is tiny
    assert PLDRConfig.resolve("tiny") == tiny
    assert PLDRConfig.resolve(tiny.to_dict()) == tiny
    assert PLDRConfig.resolve(hp) == PLDRConfig.from_hpdict(hp)
    assert PLDRConfig.resolve(tmp_path / "config.json") == tiny
    assert PLDRConfig.resolve(str(tmp_path)) == tiny  # a model folder
    with pytest.raises(ConfigError, match="--model 'pldr-9000b' is neither a preset"):
        PLDRConfig.resolve("pldr-9000b", "--model")
    with pytest.raises(TypeError, match="config must be"):
        PLDRConfig.resolve(3)


def test_rope_style_round_trips_and_is_checked(tmp_path):
    half = PLDRConfig.preset("tiny").replace(rope_style="half")
    assert PLDRConfig.preset("tiny").rope_style == "interleaved"
    assert "rope_style" not in PLDRConfig.preset("tiny").to_hpdict()  # the original's keys only
    assert PLDRConfig.from_hpdict(half.to_hpdict()) == half
    half.to_json(tmp_path / "config.json")
    assert PLDRConfig.from_json(tmp_path / "config.json") == half
    with pytest.raises(ConfigError, match="'rope_style' must be one of"):
        PLDRConfig.preset("tiny").replace(rope_style="neox")
    with pytest.raises(ConfigError, match="'rope_style' must be a string"):
        PLDRConfig.preset("tiny").replace(rope_style=1)
