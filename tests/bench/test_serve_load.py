"""`pldr bench --what serve` runs a real load test and records its figures (no timing is
asserted: speed is what the benchmark reports, not what tests check)."""

import json

from pldr.cli import main


def test_serve_bench_records_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--what", "serve", "--model", "tiny", "--requests", "4",
                 "--clients", "1,2", "--rss-requests", "4,8", "--new-tokens", "4",
                 "--prompt-len", "8", "--json", str(out)]) == 0
    serve = json.loads(out.read_text())["serve"]
    assert [r["clients"] for r in serve["runs"]] == [1, 2]
    assert all(r["failed"] == 0 and r["requests"] == 4 and r["tokens"] > 0 for r in serve["runs"])
    assert all(r["ttft_p50_s"] <= r["ttft_p99_s"] for r in serve["runs"])
    assert set(serve["rss_mb"]) == {"4", "8"} and serve["speedup"] > 0
    assert "aggregate tok/s at 2 clients" in capsys.readouterr().out


def test_serve_bench_refuses_a_model_directory(tmp_path, capsys):
    from pldr import PLDRConfig, PLDRModel

    PLDRModel(PLDRConfig.preset("tiny")).save_pretrained(tmp_path)  # a real model directory
    assert main(["bench", "--what", "serve", "--model", str(tmp_path)]) == 2
    assert "measures a preset shape" in capsys.readouterr().err


def test_an_unwritable_json_path_fails_before_measuring(tmp_path, capsys):
    assert main(["bench", "--what", "prefill", "--model", "tiny", "--json",
                 str(tmp_path / "missing" / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --json") and err.count("\n") == 1
