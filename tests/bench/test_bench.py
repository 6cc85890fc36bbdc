"""`pldr bench` runs and records what it measured (no timing is asserted here)."""

import json

import pytest
import torch

from pldr.cli import main
from pldr.model import linear


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


def test_bench_train_with_activation_checkpointing_adds_a_run_and_its_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--what", "train", "--activation-checkpointing",
                 "--repeats", "1", "--train-batch", "1", "--train-len", "16",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["spec"]["activation_checkpointing"] for r in data["results"]] == [False, True]
    ratios = data["ratios"]
    for key in ("train float32 checkpointed / plain tokens/s",
                "train float32 checkpointed / plain peak RSS"):
        assert ratios[key] > 0, ratios
    assert "train checkpointed" in capsys.readouterr().out


def test_bench_finetune_measures_full_against_lora(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--what", "finetune", "--lora-r", "2",
                 "--repeats", "1", "--train-batch", "2", "--train-len", "16",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["spec"]["what"], r["spec"]["lora_r"]) for r in data["results"]] == [
        ("finetune", 0), ("finetune", 2)]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in data["results"])
    for key in ("finetune lora r2 float32 / full tokens/s",
                "finetune lora r2 float32 / full peak RSS"):
        assert data["ratios"][key] > 0, data["ratios"]
    text = capsys.readouterr().out
    assert "finetune full" in text and "finetune lora r2" in text


@pytest.mark.parametrize("args, message", [
    (["--what", "fly"], "--what 'fly' is unknown"),
    (["--cache", "kv"], "--cache 'kv' is unknown"),
    (["--model", "nope"], "neither a preset"),
    (["--dtype", "int4"], "--dtype 'int4' is unknown"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--suite", "--model", "nope"], "neither a preset"),
    (["--suite", "--device", "nope"], "unknown device 'nope'"),
    (["--dtype", "int8", "--what", "train"], "--dtype int8 (int8 weights) is for decode"),
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


def test_bench_suite_writes_every_named_key(tmp_path, capsys):
    """At the default --prefill-len (512) on tiny (max_seq_len 256) the prefill is fitted to
    256 tokens, said so, and its key says 256."""
    from pldr.bench.suite import KEYS, suite_keys

    out = tmp_path / "suite.json"
    assert main(["bench", "--suite", "--quick", "--model", "tiny", "--prompt-len", "6",
                 "--new-tokens", "4", "--train-batch", "1",
                 "--train-len", "8", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "prefill512_s" in KEYS and "prefill512_s" not in data
    assert data["results"]["prefill256_s"]["spec"]["prefill_len"] == 256
    for key in suite_keys(256):
        assert isinstance(data[key], (int, float)) and data[key] > 0, key
    assert all(len(r["seconds"]) == 1 for r in data["results"].values())  # --quick
    # the figures are the measurements': the int8 run decoded with int8 weights
    assert data["results"]["decode_kv_g_int8_tok_s"]["spec"]["dtype"] == "int8"
    assert data["results"]["decode_sdpa_baseline_tok_s"]["spec"]["variant"] == "v510G"
    assert data["train_peak_rss_mb"] == data["results"]["train_tok_s"]["peak_rss_mb"]
    want = data["decode_kv_g_tok_s"] * data["decode_bytes_per_token"] / (data["gemv_gb_s"] * 1e9)
    assert abs(data["decode_roofline_fraction"] - want) <= 1e-9 * want
    machine = data["machine"]
    for key in ("cpu", "avx2", "avx512f", "avx512_bf16", "amx", "threads", "torch", "cuda"):
        assert key in machine, key
    assert machine["threads"] == 1
    assert machine["few_row_products_turned"] is linear.WEIGHT_LEFT_PAYS
    assert "kv_g / sdpa_baseline" in data["ratios"]
    printed = capsys.readouterr().out
    assert "decode_roofline_fraction:" in printed
    assert "max_seq_len 256" in printed and "--prefill-len 512 -> 256" in printed
    assert printed.index("measuring") < printed.index("decode_kv_g_tok_s:")


def test_bench_fits_its_default_lengths_to_a_small_model(tmp_path, capsys):
    """`pldr bench --model tiny --quick` at the default lengths (prefill 512, train 256) on a
    model of 96 positions: every row runs at a fitted length, a note names the flags, and a
    header precedes the rows."""
    from pldr import PLDRConfig, PLDRModel

    small = PLDRConfig.preset("tiny").replace(num_layers=1, max_seq_len=96)
    PLDRModel(small).save_pretrained(tmp_path / "m")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tmp_path / "m"), "--quick", "--what",
                 "decode,prefill,train", "--cache", "kv_g", "--train-batch", "1",
                 "--json", str(out)]) == 0
    specs = [r["spec"] for r in json.loads(out.read_text())["results"]]
    assert [s["what"] for s in specs] == ["decode", "prefill", "train"]
    for s in specs:
        assert s["prompt_len"] + s["new_tokens"] <= 96
        assert s["prefill_len"] == 96 and s["train_len"] == 96
    printed = capsys.readouterr().out
    assert "max_seq_len 96" in printed
    for note in ("--new-tokens 128 -> 32", "--prefill-len 512 -> 96", "--train-len 256 -> 96"):
        assert note in printed, printed
    header = printed.index("measuring 3 figure(s)")
    assert header < printed.index("[1/3] decode kv_g") < printed.index("[3/3] train")


def test_fit_lengths_keeps_what_fits_and_names_what_changed():
    from pldr.bench.measure import fit_lengths

    same, notes = fit_lengths(1024, prompt_len=64, new_tokens=128, prefill_len=512,
                              train_len=256)
    assert same == dict(prompt_len=64, new_tokens=128, prefill_len=512, train_len=256)
    assert notes == []
    fit, notes = fit_lengths(40, prompt_len=64, new_tokens=128, prefill_len=512, train_len=8)
    assert fit == dict(prompt_len=10, new_tokens=30, prefill_len=40, train_len=8)
    assert notes == ["--prompt-len 64 -> 10", "--new-tokens 128 -> 30", "--prefill-len 512 -> 40"]


def test_decode_bytes_per_token_counts_weights_and_caches():
    from pldr import PLDRConfig, PLDRModel
    from pldr.bench.measure import decode_bytes_per_token

    model = PLDRModel(PLDRConfig.resolve("tiny", "--model"))
    cfg = model.config
    per_position = 2 * cfg.num_layers * cfg.d_model * 4  # k and v, float32
    assert decode_bytes_per_token(model, 10) - decode_bytes_per_token(model, 0) == 10 * per_position
    linear = sum(m.weight.numel() + m.bias.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "reslayerAs" not in n)
    assert decode_bytes_per_token(model, 0) > 4 * linear


def test_decode_bytes_per_token_counts_packed_int8_and_bf16_weights():
    from pldr import PLDRConfig, PLDRModel
    from pldr.bench.measure import decode_bytes_per_token
    from pldr.model.quantize import pack_bf16, quantize_int8

    config = PLDRConfig.resolve("tiny", "--model")
    fp32 = decode_bytes_per_token(PLDRModel(config).eval(), 0)
    int8 = decode_bytes_per_token(quantize_int8(PLDRModel(config)), 0)
    bf16 = decode_bytes_per_token(pack_bf16(PLDRModel(config).bfloat16()), 0)
    final = config.vocab_size * config.d_model                  # the int8 final layer alone
    assert final < int8 < 0.5 * fp32
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)


def test_bench_finetune_measures_each_lora_target_set(tmp_path, capsys):
    """`--lora-targets` measures LoRA on the named layers beside full fine-tuning, with its
    own ratio (the flag repeats for several sets)."""
    out = tmp_path / "ft.json"
    assert main(["bench", "--model", "tiny", "--what", "finetune", "--lora-r", "2", "--quick",
                 "--train-batch", "1", "--train-len", "16", "--lora-targets", "wq, wv",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = [(r["spec"]["lora_r"], r["spec"]["lora_targets"]) for r in data["results"]]
    assert runs == [(0, ""), (2, "wq,wv")]
    assert "finetune lora r2 [wq,wv] float32 / full tokens/s" in data["ratios"]
    assert "finetune lora r2 [wq,wv]" in capsys.readouterr().out
