"""`pldr bench` runs and records what it measured (no timing is asserted here)."""

import json

import pytest

from pldr.cli import main


def test_bench_records_results_and_machine(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--what", "decode,train", "--cache", "kv_g,g_only",
                 "--compare-G", "--repeats", "1", "--prompt-len", "8", "--new-tokens", "4",
                 "--train-batch", "1", "--train-len", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [(r["spec"]["what"], r["spec"]["cache"], r["spec"]["variant"]) for r in data["results"]]
    # v510G has no G-cache, so its g_only decode is not measured
    assert names == [("decode", "kv_g", None), ("decode", "g_only", None), ("train", "kv_g", None),
                     ("decode", "kv_g", "v510G"), ("train", "kv_g", "v510G")]
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and len(r["seconds"]) == 1
    assert "cpu_flags" in data["machine"] and data["machine"]["torch"]
    assert "decode kv_g" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--what", "fly"], "--what 'fly' is unknown"),
    (["--cache", "kv"], "--cache 'kv' is unknown"),
    (["--model", "nope"], "neither a preset"),
    (["--dtype", "int8"], "--dtype 'int8' is unknown"),
])
def test_bench_bad_input(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_bench_engine_records_throughput_per_batch_and_the_ratio(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--what", "engine", "--batch", "1,3",
                 "--repeats", "1", "--prompt-len", "6", "--new-tokens", "5",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [(r["spec"]["what"], r["spec"]["batch"], r["spec"]["compile"]) for r in data["results"]]
    assert rows == [("engine", 1, False), ("engine", 3, False)]
    assert all(r["tokens_per_s"] > 0 for r in data["results"])
    ratio = data["ratios"]["engine kv_g float32 x3 / x1"]
    assert ratio == data["results"][1]["tokens_per_s"] / data["results"][0]["tokens_per_s"]


def test_bench_bad_batch(capsys):
    assert main(["bench", "--what", "engine", "--batch", "x"]) == 2
    assert "--batch expects comma-separated integers" in capsys.readouterr().err
