"""`pldr finetune` end to end on synthetic tasks written from the built-in corpus: each head
task learns its planted answer (accuracy >= 95%, entity F1 >= 0.9, QA exact match >= 80%),
causal fine-tuning lowers the completion loss, the results load with `load_model` and score
the same with `pldr eval --task`, and bad input fails in one line before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pldr
from finetune_data import causal_rows, qa_rows, sequence_rows, token_rows, write_jsonl
from pldr.cli import main as cli_main
from pldr.finetune import FinetuneConfig, finetune, score
from pldr.training.metrics import read_metrics
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)

FAST = dict(batch_size=16, lr=5e-3, warmup_steps=5, log_every=10, max_length=64,
            progress=False, tensorboard=False)


def data_files(tmp_path: Path, rows, n_train: int = 320) -> tuple[str, str]:
    return (write_jsonl(tmp_path / "train.jsonl", rows(n_train, 0)),
            write_jsonl(tmp_path / "val.jsonl", rows(64, 1)))


def run(base: dict, tmp_path: Path, task: str, rows, **changes):
    train, val = data_files(tmp_path, rows)
    cfg = FinetuneConfig(task=task, model=base["model"], data=train, eval_data=val,
                         out=str(tmp_path / "out"), **{**FAST, "epochs": 2, **changes})
    return finetune(cfg), val


def last_val(result) -> dict:
    return [r for r in result.records if r["split"] == "val"][-1]


def test_sequence_classification_learns_the_planted_word(base, tmp_path, capsys):
    result, val = run(base, tmp_path, "sequence-classification", sequence_rows, eval_every=10,
                      epochs=3)
    evals = [r for r in result.records if r["split"] == "val"]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    figures = max(evals, key=lambda r: r["accuracy"])  # the first best, kept as OUT/best
    assert figures["accuracy"] >= 0.95 and figures["macro_f1"] >= 0.95
    model = pldr.load_model(result.final_dir)
    assert isinstance(model, pldr.PLDRForSequenceClassification)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    # the record is in metrics.jsonl, as in pretraining; best/ holds the best evaluation
    assert read_metrics(tmp_path / "out", "val") == evals
    assert isinstance(pldr.load_model(tmp_path / "out" / "best"), type(model))
    # pldr eval --task scores the best model the same way
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--task", "sequence-classification", "--model",
                     str(tmp_path / "out" / "best"), "--data", val, "--output", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["accuracy"] == pytest.approx(figures["accuracy"])
    assert scored["rows"] == 64


def test_token_classification_finds_the_planted_names(base, tmp_path):
    result, _ = run(base, tmp_path, "token-classification", token_rows)
    figures = last_val(result)
    assert figures["f1"] >= 0.9, figures
    model = pldr.load_model(result.final_dir)
    assert isinstance(model, pldr.PLDRForTokenClassification)
    assert model.config.id2label == {0: "B-PER", 1: "O"}


def test_question_answering_extracts_the_planted_span(base, tmp_path):
    result, val = run(base, tmp_path, "question-answering", qa_rows)
    figures = last_val(result)
    assert figures["exact_match"] >= 80.0, figures
    scored = score("question-answering", str(result.final_dir), val)
    assert scored["exact_match"] == pytest.approx(figures["exact_match"])


def test_causal_fine_tuning_on_the_tiny_preset_lowers_the_completion_loss(base, tmp_path):
    config = pldr.PLDRConfig.preset("tiny").replace(vocab_size=base["config"].vocab_size)
    torch.manual_seed(0)
    pldr.PLDRModel(config).save_pretrained(tmp_path / "tiny", tokenizer=base["tokenizer"])
    train, val = data_files(tmp_path, causal_rows, 64)
    before = score("causal", str(tmp_path / "tiny"), val)
    cfg = FinetuneConfig(task="causal", model=str(tmp_path / "tiny"), data=train,
                         eval_data=val, out=str(tmp_path / "out"), max_steps=12,
                         **{**FAST, "lr": 1e-3, "batch_size": 8})
    result = finetune(cfg)
    after = last_val(result)
    assert after["loss"] < before["loss"] - 0.5
    assert after["perplexity"] == pytest.approx(pytest.importorskip("math").exp(after["loss"]))
    model = pldr.load_model(result.final_dir)  # a causal model directory: generate reads it
    assert isinstance(model, pldr.PLDRModel)
    assert len(pldr.generate(model, [[5, 6, 7]], 3, temperature=0)[0]) == 3


def bad(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "never"
    assert cli_main(["finetune", *args, "--out", str(out), "--no-progress"]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_before_anything_is_written(base, tmp_path, capsys):
    m = base["model"]
    rows = sequence_rows(20, 0)
    rows[7]["label"] = 3
    data = write_jsonl(tmp_path / "bad_label.jsonl", rows)
    assert "row 7" in bad(tmp_path, capsys, "--task", "sequence-classification", "--model", m,
                          "--data", data, "--num-labels", "2")
    data = write_jsonl(tmp_path / "no_col.jsonl", [{"sentence": "a", "label": 0}] * 20)
    assert "--text-column" in bad(tmp_path, capsys, "--task", "sequence-classification",
                                  "--model", m, "--data", data)
    rows = token_rows(20, 0)
    rows[2]["ner_tags"].append("O")
    data = write_jsonl(tmp_path / "lengths.jsonl", rows)
    assert "words but" in bad(tmp_path, capsys, "--task", "token-classification", "--model", m,
                              "--data", data)
    rows = qa_rows(20, 0)
    rows[4]["answers"]["answer_start"] = [500]
    data = write_jsonl(tmp_path / "offsets.jsonl", rows)
    assert "outside its context" in bad(tmp_path, capsys, "--task", "question-answering",
                                        "--model", m, "--data", data)
    data = write_jsonl(tmp_path / "ok.jsonl", sequence_rows(20, 0))
    err = bad(tmp_path, capsys, "--task", "sequence-classification", "--model", m, "--data",
              data, "--lora-r", "2", "--lora-targets", "wq,query")
    assert "'query' matches no linear layer" in err
    missing = str(tmp_path / "missing.jsonl")  # the data package's error, on the right flag
    err = bad(tmp_path, capsys, "--task", "sequence-classification", "--model", m, "--data",
              data, "--eval-data", missing)
    assert err.startswith(f"error: --eval-data path {missing!r} does not exist"), err
    head = tmp_path / "seqcls"
    pldr.PLDRForSequenceClassification(base["config"]).save_pretrained(
        head, tokenizer=base["tokenizer"])
    rows = token_rows(20, 0)
    err = bad(tmp_path, capsys, "--task", "token-classification", "--model", str(head),
              "--data", write_jsonl(tmp_path / "tok.jsonl", rows))
    assert "PLDRForSequenceClassification" in err and "token-classification" in err


def test_config_file_and_early_stopping(base, tmp_path, capsys):
    """Settings from --config (flags override them); evaluations that stop improving end
    the run early, with OUT/final written and OUT/best at the best evaluation."""
    train, val = data_files(tmp_path, sequence_rows, 64)
    config = tmp_path / "ft.json"
    config.write_text(json.dumps({"task": "sequence-classification", "model": base["model"],
                                  "data": train, "eval_data": val, "lr": "1e-9",
                                  "warmup_steps": 0, "batch_size": 8, "max_steps": 8,
                                  "eval_every": 2, "early_stopping": 1, "metric": "accuracy",
                                  "tensorboard": False}))
    out = tmp_path / "out"
    assert cli_main(["finetune", "--config", str(config), "--out", str(out), "--no-progress",
                     "--max-steps", "10"]) == 0
    assert "fine-tuned 4 steps" in capsys.readouterr().out  # evaluations at 2 and 4
    val_steps = [r["step"] for r in read_metrics(out, "val")]
    assert val_steps == [2, 4]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "best" / "model.safetensors").is_file()
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath(
        "trainer_state.json").read_text())
    assert state["extra"]["best"]["step"] == 2 and state["extra"]["finetune"]["max_steps"] == 10
