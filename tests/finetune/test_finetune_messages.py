"""Fine-tuning errors name the Python parameter (a `FinetuneConfig` field, or `score`'s
argument) in backticks, with `param` set; `pldr finetune` and `pldr eval --task` show the
same error with their flags."""

from __future__ import annotations

import pytest

import pldr
from finetune_data import sequence_rows, token_rows, write_jsonl
from pldr.cli import main as cli_main
from pldr.errors import CheckpointError, ConfigError
from pldr.finetune import FinetuneConfig, score
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)


def cli_error(capsys, *argv: str) -> str:
    """The one `error:` line of a command that must fail with exit status 2."""
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_merge_without_lora_names_the_fields_then_the_flags(base, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(model=base["model"], data="rows.jsonl", merge=True).check()
    assert str(e.value) == "`merge` merges LoRA adapters: give `lora_r=N` as well"
    assert e.value.param == "merge"
    data = write_jsonl(tmp_path / "rows.jsonl", sequence_rows(8, 0))
    out = tmp_path / "run"
    err = cli_error(capsys, "finetune", "--model", base["model"], "--data", data, "--out",
                    str(out), "--merge", "--no-progress")
    assert err == "error: --merge merges LoRA adapters: give --lora-r N as well"
    assert not out.exists()


def test_scoring_a_model_of_another_task_names_model_path_then_model(base, tmp_path, capsys):
    head = tmp_path / "seqcls"
    pldr.PLDRForSequenceClassification(base["config"]).save_pretrained(
        head, tokenizer=base["tokenizer"])
    data = write_jsonl(tmp_path / "tok.jsonl", token_rows(4, 0))
    with pytest.raises(CheckpointError) as e:
        score("token-classification", str(head), data)
    assert str(e.value).startswith(f"`model_path` {str(head)!r} is a "
                                   "PLDRForSequenceClassification, not a model for "
                                   "`task='token-classification'`")
    assert e.value.param == "model_path"
    err = cli_error(capsys, "eval", "--task", "token-classification", "--model", str(head),
                    "--data", data)
    assert err.startswith(f"error: --model {str(head)!r} is a PLDRForSequenceClassification, "
                          "not a model for --task token-classification: score a model "
                          "fine-tuned for it"), err
