"""Bad input, tried as a careless or hostile user would, across every command and the
Python API: each gives one `error: ...` line and exit status 2 (the API: a PLDRError),
never a traceback; no half-written output remains, and the user's own files survive byte
for byte."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch

import pldr
from pldr import PLDRConfig, PLDRError, PLDRModel
from pldr.cli import main as cli_main

TINY = PLDRConfig.preset("tiny").replace(num_layers=1, d_model=32, num_heads=2, dff=64,
                                         num_reslayerA=1, num_denseA=1, A_dff=16,
                                         max_seq_len=64)


class Payload:
    """A pickle that would create a file if it ever ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """A tiny model directory with its tokenizer, files of bad content, and a folder of the
    user's own files that must survive every case."""
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer
    from pldr.model.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("bad_inputs")
    tok = Tokenizer.train(load_documents("builtin", "train[:5%]"), 400)
    tok.save(root / "tok.model")
    config = TINY.replace(vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    save_pretrained(PLDRModel(config), root / "model", tokenizer=root / "tok.model")
    save_pretrained(PLDRModel(config.replace(vocab_size=64)), root / "small_model")
    (root / "data.txt").write_text("hello world. " * 200, encoding="utf-8")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x80" * 64)
    (root / "junk.bin").write_bytes(os.urandom(512))
    (root / "empty.txt").write_bytes(b"")
    (root / "not_json.json").write_text("{not json", encoding="utf-8")
    (root / "number.json").write_text("123", encoding="utf-8")
    (root / "bad_config.json").write_text(json.dumps({**config.to_dict(), "rope_base": -1}),
                                          encoding="utf-8")
    marker = root / "PWNED"
    with open(root / "evil.pt", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    nan_G = [torch.full((config.num_heads, config.d_model // config.num_heads,
                         config.d_model // config.num_heads), float("nan"))]
    torch.save(nan_G, root / "nan_G.pt")
    user = root / "user"  # a folder of the user's files, also holding a train_config.json
    user.mkdir()
    (user / "notes.txt").write_text("mine\n", encoding="utf-8")
    (user / "train_config.json").write_text('{"mine": true}\n', encoding="utf-8")
    (user / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    return {"root": str(root), "model": str(root / "model"),
            "small_model": str(root / "small_model"), "tok": str(root / "tok.model"),
            "data": str(root / "data.txt"), "binary": str(root / "binary.txt"),
            "junk": str(root / "junk.bin"), "empty": str(root / "empty.txt"),
            "not_json": str(root / "not_json.json"), "number": str(root / "number.json"),
            "bad_config": str(root / "bad_config.json"), "evil": str(root / "evil.pt"),
            "marker": str(marker), "nan_G": str(root / "nan_G.pt"), "user": str(user),
            "out": str(root / "out"), "missing": str(root / "no_such_thing")}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


GEN = ["generate", "--model", "{model}", "--max-new-tokens", "3"]
TRAIN = ["train", "--model", "tiny", "--tokenizer", "{tok}", "--data", "{data}", "--out",
         "{out}", "--max-steps", "1", "--batch-size", "2", "--context-length", "16",
         "--no-progress", "--no-tensorboard", "--val-split", "none"]

CLI_CASES = [
    # generate
    ("gen nan temperature", GEN + ["--ids", "5,6", "--temperature", "nan"], "temperature"),
    ("gen inf temperature", GEN + ["--ids", "5,6", "--temperature", "inf"], "temperature"),
    ("gen subnormal temperature", GEN + ["--ids", "5,6", "--temperature", "1e-45"],
     "temperature"),
    ("gen negative temperature", GEN + ["--ids", "5,6", "--temperature", "-1"], "temperature"),
    ("gen top_p 0", GEN + ["--ids", "5,6", "--top-p", "0"], "top_p"),
    ("gen top_p nan", GEN + ["--ids", "5,6", "--top-p", "nan"], "top_p"),
    ("gen top_p above 1", GEN + ["--ids", "5,6", "--top-p", "1.5"], "top_p"),
    ("gen negative top_k", GEN + ["--ids", "5,6", "--top-k", "-3"], "top_k"),
    ("gen huge seed", GEN + ["--ids", "5,6", "--seed", str(2 ** 70)], "seed"),
    ("gen negative seed", GEN + ["--ids", "5,6", "--seed", "-5"], "seed"),
    ("gen text seed", GEN + ["--ids", "5,6", "--seed", "abc"], "--seed"),
    ("gen eos outside vocab", GEN + ["--ids", "5,6", "--eos-id", "99999"], "eos_id"),
    ("gen id outside vocab", GEN + ["--ids", "5,99999"], "outside the vocabulary"),
    ("gen ids not numbers", GEN + ["--ids", "a,b"], "--ids"),
    ("gen negative max new", ["generate", "--model", "{model}", "--ids", "5",
                              "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("gen too long", ["generate", "--model", "{model}", "--ids", "5",
                      "--max-new-tokens", "100000"], "max_seq_len"),
    ("gen missing model", ["generate", "--model", "{missing}", "--prompt", "hi"], "does not exist"),
    ("gen model is a file", ["generate", "--model", "{junk}", "--prompt", "hi"], None),
    ("gen json as model", ["generate", "--model", "{number}", "--prompt", "hi"], None),
    ("gen evil G_LM", GEN + ["--ids", "5,6", "--G-LM", "{evil}"], None),
    ("gen nan G_LM", GEN + ["--ids", "5,6", "--G-LM", "{nan_G}"], None),
    ("gen missing G_LM", GEN + ["--ids", "5,6", "--G-LM", "{missing}"], None),
    ("gen folder as G_LM", GEN + ["--ids", "5,6", "--G-LM", "{root}"], None),
    ("gen unknown device", GEN + ["--ids", "5,6", "--device", "tpu9"], None),
    ("gen meta device", GEN + ["--ids", "5,6", "--device", "meta"], None),
    ("gen unknown cache", GEN + ["--ids", "5,6", "--cache", "magic"], "--cache"),
    ("gen bad config", GEN + ["--ids", "5,6", "--config", "{not_json}"], None),
    ("gen random tokenizer", GEN + ["--prompt", "hi", "--tokenizer", "{junk}"], None),
    # train
    ("train lr nan", TRAIN + ["--lr", "nan"], "--lr"),
    ("train lr negative", TRAIN + ["--lr", "-1"], "--lr"),
    ("train batch 0", TRAIN + ["--batch-size", "0"], "--batch-size"),
    ("train missing data", TRAIN + ["--data", "{missing}"], None),
    ("train empty data", TRAIN + ["--data", "{empty}"], None),
    ("train binary data", TRAIN + ["--data", "{binary}"], "binary.txt' is not UTF-8"),
    ("train missing tokenizer", TRAIN + ["--tokenizer", "{missing}"], "--tokenizer"),
    ("train unknown model", TRAIN + ["--model", "pldr-9000b"], None),
    ("train bad model config", TRAIN + ["--model", "{bad_config}"], "rope_base"),
    ("train resume nothing", TRAIN + ["--resume", "auto"], "no complete checkpoint"),
    ("train resume json", TRAIN + ["--resume", "{number}"], "not a training checkpoint"),
    ("train into user folder", TRAIN[:8] + ["{user}"] + TRAIN[9:] + ["--resume", "auto"],
     "no complete checkpoint"),
    ("train fresh into user folder", TRAIN[:8] + ["{user}"] + TRAIN[9:], "did not write"),
    ("train unknown device", TRAIN + ["--device", "mps"], None),
    ("train context too long", TRAIN + ["--context-length", "100000"], None),
    ("train bad dag", TRAIN + ["--dag-coeffs", "1,nan,2"], "--dag-coeffs"),
    ("train bad config file", TRAIN + ["--config", "{not_json}"], None),
    # convert
    ("convert missing src", ["convert", "{missing}", "--out", "{out}"], None),
    ("convert junk src", ["convert", "{junk}", "--out", "{out}"], None),
    ("convert evil pickle", ["convert", "{evil}", "--out", "{out}"], None),
    ("convert random tokenizer", ["convert", "{model}", "--out", "{out}", "--tokenizer",
                                  "{junk}"], "not a SentencePiece"),
    ("convert dcp not a dcp", ["convert", "--dcp", "{root}", "--out", "{out}"], None),
    ("convert small-vocab model, big tokenizer", ["convert", "{small_model}", "--out", "{out}",
                                                  "--tokenizer", "{tok}"], "pieces"),
    ("convert unknown layout", ["convert", "{model}", "--out", "{out}", "--to", "onnx"],
     "--to"),
    # info
    ("info missing", ["info", "{missing}"], None),
    ("info junk", ["info", "{junk}"], None),
    ("info evil pickle", ["info", "{evil}"], None),
    ("info json", ["info", "{number}"], None),
    # bench
    ("bench missing model", ["bench", "--model", "{missing}"], None),
    ("bench json unwritable", ["bench", "--model", "{model}", "--json", "{missing}/x/y.json"],
     None),
    # tokenizer
    ("tokenizer vocab 0", ["tokenizer", "--input", "{data}", "--vocab-size", "0", "--out",
                           "{out}/tok"], None),
    ("tokenizer missing input", ["tokenizer", "--input", "{missing}", "--vocab-size", "100",
                                 "--out", "{out}/tok"], None),
    ("tokenizer empty input", ["tokenizer", "--input", "{empty}", "--vocab-size", "100",
                               "--out", "{out}/tok"], None),
    # demo
    ("demo into user folder", ["demo", "--out", "{user}", "--steps", "1"], None),
    ("demo steps 0", ["demo", "--out", "{out}", "--steps", "0"], None),
    ("demo bad device", ["demo", "--out", "{out}", "--steps", "1", "--device", "xpu"], None),
    # serve (argument level only: nothing binds)
    ("serve missing model", ["serve", "--model", "{missing}"], "does not exist"),
    ("serve bad port", ["serve", "--model", "{model}", "--port", "70000"], None),
    ("serve max batch 0", ["serve", "--model", "{model}", "--max-batch", "0"], None),
    ("serve port text", ["serve", "--model", "{model}", "--port", "http"], "--port"),
    # eval
    ("eval missing model", ["eval", "--model", "{missing}", "--tasks", "x"], "does not exist"),
    ("eval batch 0", ["eval", "--model", "{model}", "--tasks", "x", "--batch-size", "0"], None),
    # inspect
    ("inspect missing model", ["inspect", "--model", "{missing}", "--text", "hi", "--out",
                               "{out}"], "does not exist"),
    ("inspect id outside", ["inspect", "--model", "{model}", "--ids", "99999", "--out",
                            "{out}"], None),
    ("inspect bad layers", ["inspect", "--model", "{model}", "--ids", "5,6", "--layers", "7-9",
                            "--out", "{out}"], None),
    # data
    ("data missing source", ["data", "prepare", "--data", "{missing}", "--out", "{out}"], None),
    ("data workers 0", ["data", "prepare", "--data", "{data}", "--out", "{out}",
                        "--tokenizer", "{tok}", "--workers", "0"], None),
    ("data info missing", ["data", "info", "{missing}"], None),
]


@pytest.mark.parametrize("name, argv, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line(env, capsys, tmp_path, name, argv, message):
    env = {**env, "out": str(tmp_path / "out")}
    user_before = snapshot(Path(env["user"]))
    rc, err = run_cli([a.format(**env) for a in argv], capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    if message is not None:
        assert message in err, err
    assert not Path(env["out"]).exists()  # no half-written output
    assert snapshot(Path(env["user"])) == user_before  # the user's files, byte for byte
    assert not Path(env["marker"]).exists()  # no pickle payload ever ran


def test_there_are_at_least_sixty_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 60


def _model(env):
    return pldr.load_model(env["model"])


API_CASES = [
    ("generate nan temperature", lambda m, e: pldr.generate(m, [[5]], 2, temperature=float("nan"))),
    ("generate top_p 1e-300 ok", None),
    ("generate seed text", lambda m, e: pldr.generate(m, [[5]], 2, seed="abc")),
    ("generate seed huge", lambda m, e: pldr.generate(m, [[5]], 2, seed=2 ** 80)),
    ("generate eos outside", lambda m, e: pldr.generate(m, [[5]], 2, eos_id=10 ** 6)),
    ("generate empty prompt", lambda m, e: pldr.generate(m, [[]], 2)),
    ("generate float ids", lambda m, e: pldr.generate(m, torch.ones(1, 3), 2)),
    ("engine seed text", lambda m, e: pldr.Engine(m, max_batch=1, max_len=8).submit(
        [5], 2, seed="abc")),
    ("load_model missing", lambda m, e: pldr.load_model(e["missing"])),
    ("load_model evil", lambda m, e: pldr.load_model(e["evil"])),
    ("load_model meta device", lambda m, e: pldr.load_model(e["model"], device="meta")),
    ("load_G_LM evil", lambda m, e: pldr.load_G_LM(e["evil"])),
    ("load_G_LM nan", lambda m, e: pldr.load_G_LM(e["nan_G"])),
    ("config nan rope", lambda m, e: TINY.replace(rope_base=float("nan"))),
    ("tokenizer junk", lambda m, e: pldr.Tokenizer.load(e["junk"])),
]
API_CASES = [c for c in API_CASES if c[1] is not None]


@pytest.mark.parametrize("name, call", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_pldr_error(env, name, call):
    with pytest.raises(PLDRError) as err:
        call(_model(env), env)
    assert "\n" not in str(err.value).strip()
    assert not Path(env["marker"]).exists()


def test_a_tiny_top_p_still_generates(env):
    m = _model(env)
    assert pldr.generate(m, [[5, 6]], 3, top_p=1e-300, seed=1, eos_id=-1) == \
        pldr.generate(m, [[5, 6]], 3, temperature=0, eos_id=-1)


def test_serve_on_a_port_in_use_is_one_error_line(env, capsys):
    # refused before the model loads (uvicorn would say so only in its log, exit 3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, err = run_cli(["serve", "--model", env["model"], "--port", str(port)], capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
