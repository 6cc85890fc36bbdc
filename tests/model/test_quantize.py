"""Weight-only int8 (model/quantize.py): what is quantised, the kernel's arithmetic, and how
close int8 decoding stays to float32 on a small model trained briefly on the built-in corpus."""

import copy
import json

import pytest
import torch
from fixture_utils import assert_same, fixture_model, generation, inputs
from torch import nn

from pldr.cli import main
from pldr.data import load_documents
from pldr.errors import PLDRError
from pldr.inference.generate import generate
from pldr.model.losses import loss_with_dag
from pldr.model.quantize import Int8Linear, quantize_int8, weight_bytes

T = 64  # training and evaluation window


def test_int8_linear_computes_with_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 48)
    want = x @ q.dequantized().T + lin.bias.detach()
    assert_same(q(x), want, "int8 matmul")
    # per-row rounding error at most half a step of that row's scale
    err = (q.dequantized() - lin.weight.detach()).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    assert q.weight_int8.dtype == torch.int8 and q(x).shape == (2, 3, 20)


def test_quantize_keeps_queries_metric_learner_norms_and_embedding_float():
    model = fixture_model()
    before = weight_bytes(model)
    quantize_int8(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["final_layer"] == "Int8Linear"
    layer = "decoder.dec_layers.0"
    for name in ("mha1.wk", "mha1.wv", "mha1.dense", "ffn.gluw1", "ffn.gluw2", "ffn.gluw3"):
        assert kinds[f"{layer}.{name}"] == "Int8Linear", name
    assert kinds[f"{layer}.mha1.wq"] == "Linear"
    assert kinds[f"{layer}.mha1.reslayerAs.0.denseAs.0.gluw1"] == "Linear"
    assert kinds[f"{layer}.layernorm1"] == "LayerNorm"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert weight_bytes(model) < 0.6 * before
    assert not any(p.requires_grad for p in model.parameters())


def test_quantize_refuses_a_model_off_cpu():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    with pytest.raises(PLDRError, match="int8 weights are for CPU"):
        quantize_int8(model)


def _corpus() -> torch.Tensor:
    """The built-in corpus as byte-level ids within the fixture's 300-piece vocabulary."""
    docs = load_documents("builtin", "train[:10%]")
    return torch.tensor([6 + b for d in docs for b in d.encode() if b < 128])


@pytest.fixture(scope="module")
def trained():
    """The fixture model trained for a few steps on the corpus (sharper logits than its
    random-like release weights, whose top two logits often tie to 1e-3) and held-out text."""
    ids = _corpus()
    held, train = ids[-16 * (T + 1):].view(16, T + 1), ids[:-16 * (T + 1)]
    torch.manual_seed(0)
    model = fixture_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        starts = torch.randint(0, len(train) - T - 1, (8,))
        batch = torch.stack([train[s:s + T + 1] for s in starts])
        loss = loss_with_dag(model(batch[:, :-1]).logits, batch[:, 1:], None).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), held


def _perplexity(model, held) -> float:
    with torch.no_grad():
        return loss_with_dag(model(held[:, :-1]).logits, held[:, 1:], None).loss.exp().item()


def test_int8_greedy_tokens_agree_with_float32_on_the_fixture_prompts(trained):
    model, _ = trained
    prompts = [generation()["prompt"]] + inputs()["tokens"].tolist()
    q = quantize_int8(copy.deepcopy(model))
    for cache in ("kv_g", "no_cache"):
        want = generate(model, prompts, 32, cache=cache, temperature=0, eos_id=-1)
        got = generate(q, prompts, 32, cache=cache, temperature=0, eos_id=-1)
        same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
        assert same >= 0.9 * 32 * len(prompts), (cache, want, got)


def test_int8_perplexity_rises_under_one_percent(trained):
    model, held = trained
    base = _perplexity(model, held)
    assert base < 100  # trained: well below the 300 of a uniform guess
    got = _perplexity(quantize_int8(copy.deepcopy(model)), held)
    assert got < 1.01 * base, (base, got)


def test_generate_cli_with_int8_weights(tmp_path, capsys):
    fixture_model().save_pretrained(tmp_path / "m")
    ids = ",".join(map(str, generation()["prompt"]))
    assert main(["generate", "--model", str(tmp_path / "m"), "--ids", ids, "--dtype", "int8",
                 "--temperature", "0", "--max-new-tokens", "6", "--eos-id", "-1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["ids"]) == 6


def test_generate_cli_refuses_int8_on_cuda(tmp_path, capsys):
    fixture_model().save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--ids", "5,6", "--dtype", "int8",
                 "--device", "cuda"]) == 2
    assert "--dtype int8 runs on CPU only" in capsys.readouterr().err
