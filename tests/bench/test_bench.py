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
