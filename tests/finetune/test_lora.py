"""LoRA fine-tuning: only the adapters and a new head train (the count the flags give), the
base weights stay byte-identical, the adapter directory names its base model and loads with
`load_model`, and --merge writes a plain model whose logits equal the adapted model's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pldr
from finetune_data import sequence_rows, write_jsonl
from pldr.checkpoint.adapters import ADAPTER_CONFIG, merge_lora
from pldr.finetune import FinetuneConfig
from pldr.finetune.runner import FinetuneTrainer, prepare_finetune
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)

LORA = dict(lora_r=4, lora_alpha=8.0, lora_targets="wq,wv,gluw1", batch_size=16, lr=5e-3,
            warmup_steps=2, max_steps=8, log_every=4, max_length=64, progress=False,
            tensorboard=False)


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """A LoRA run (adapter directory) and the same run with --merge."""
    root = tmp_path_factory.mktemp("lora")
    train = write_jsonl(root / "train.jsonl", sequence_rows(160, 0))
    val = write_jsonl(root / "val.jsonl", sequence_rows(32, 1))
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, merge in (("adapter", False), ("merged", True)):
            cfg = FinetuneConfig(task="sequence-classification", model=base["model"],
                                 data=train, eval_data=val, out=str(root / name), merge=merge,
                                 **LORA)
            trainer = FinetuneTrainer(prepare_finetune(cfg))
            runs[name] = (trainer, trainer.run())
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "val": val, **runs}


def test_only_adapters_and_the_new_head_train(adapted, base):
    trainer, _ = adapted["adapter"]
    model = trainer.model
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("score.") for n in trainable)
    cfg = base["config"]
    expected = 0
    for name, m in pldr.PLDRModel(cfg).decoder.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("wq", "wv", "gluw1"):
            expected += 4 * (m.in_features + m.out_features)  # A [r, in] + B [out, r]
    expected += cfg.d_model * 2  # the new head: score [num_labels, D], no bias
    assert sum(trainable.values()) == expected


def test_the_base_weights_are_byte_identical_after_training(adapted, base):
    trainer, _ = adapted["adapter"]
    start = pldr.load_model(base["model"]).state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in trainer.model.state_dict().items()
               if "lora_" not in k and not k.startswith("score.")}
    lora_b = [v for k, v in trainer.model.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the adapters did train
    for key, value in trained.items():
        assert torch.equal(value, start[key]), key


def test_the_adapter_directory_loads_and_merging_keeps_the_logits(adapted, base):
    _, result = adapted["adapter"]
    meta = json.loads((result.final_dir / ADAPTER_CONFIG).read_text())
    assert meta["base_model_name_or_path"] == str(Path(base["model"]).absolute())
    model = pldr.load_model(result.final_dir)
    assert isinstance(model, pldr.PLDRForSequenceClassification)
    ids = torch.randint(4, base["config"].vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        # in float64, so that only the merge itself is compared (float32 rounding of W + BA
        # is amplified by the power-law attention to ~1e-5 of the logits)
        wide = copy.deepcopy(model).double()
        adapted_logits = wide(ids, mask).logits
        merged = merge_lora(copy.deepcopy(wide))
        assert not any("lora_" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(ids, mask).logits, adapted_logits, atol=1e-5, rtol=0)
        # --merge wrote the same model as a plain directory (the same run, merged in float32
        # at export)
        plain = pldr.load_model(adapted["merged"][1].final_dir)
        assert not (adapted["merged"][1].final_dir / ADAPTER_CONFIG).exists()
        torch.testing.assert_close(plain(ids, mask).logits, model(ids, mask).logits,
                                   atol=1e-4, rtol=1e-4)


def test_a_causal_adapter_generates_with_pldr_generate(base, tmp_path, capsys):
    from finetune_data import causal_rows
    from pldr.cli import main as cli_main
    from pldr.finetune import finetune

    data = write_jsonl(tmp_path / "c.jsonl", causal_rows(32, 0))
    result = finetune(FinetuneConfig(task="causal", model=base["model"], data=data,
                                     out=str(tmp_path / "out"), **{**LORA, "max_steps": 2}))
    assert (result.final_dir / ADAPTER_CONFIG).is_file()
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(result.final_dir), "--ids", "5,6,7",
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()
