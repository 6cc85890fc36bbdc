"""pldr.hf: transformers classes over our model (AutoConfig / AutoModelForCausalLM /
AutoTokenizer for model type pldr_llm), generate with our cache, the text pipeline, and
directories that both APIs read and write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pldr
import pldr.hf  # registers pldr_llm
from pldr.hf import PLDRCache, PLDRForCausalLM, PLDRHFConfig, PLDRTokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from fixture_utils import assert_same

PORT = Path(__file__).parents[1] / "fixtures" / "hfport" / "small"
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a list is a class of the cat"]
PROMPTS = [[103, 251, 183, 80, 25, 140], [6, 89, 192], [7, 7]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The port fixture's model (vocabulary 300) saved by us, with a 300-piece tokenizer."""
    d = tmp_path_factory.mktemp("hf") / "model"
    tok = pldr.Tokenizer.train(TEXTS * 50, 300, model_type="bpe")
    pldr.load_model(PORT).save_pretrained(d, tokenizer=tok)
    return d


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()


def test_hf_config_declares_every_pldr_config_field_with_its_default():
    """PLDRHFConfig restates PLDRConfig's fields (transformers wants plain class attributes):
    a field added to PLDRConfig, or a default changed there, must show up here too."""
    import dataclasses

    hf_fields = {f.name: f for f in dataclasses.fields(PLDRHFConfig)}
    tiny = pldr.PLDRConfig.preset("tiny")
    assert PLDRHFConfig().num_labels == tiny.num_labels  # PreTrainedConfig's own property
    for f in dataclasses.fields(pldr.PLDRConfig):
        if f.name == "num_labels":
            continue
        assert f.name in hf_fields, f"PLDRHFConfig lacks the PLDRConfig field {f.name}"
        want = getattr(tiny, f.name) if f.default is dataclasses.MISSING else f.default
        assert hf_fields[f.name].default == want, f.name
    assert PLDRHFConfig().to_pldr() == tiny


@pytest.mark.parity
def test_auto_classes_load_our_directory_and_give_our_logits(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, PLDRHFConfig) and config.to_pldr() == pldr.load_model(model_dir).config
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(hf, PLDRForCausalLM) and not hf.training
    ours = pldr.load_model(model_dir)
    ids = torch.tensor([[103, 251, 183, 80, 25, 140, 52, 11], [6, 89, 192, 21, 236, 246, 267, 135]])
    with torch.no_grad():
        got, want = hf(ids, output_deductive=True), ours(ids, return_deductive=True)
    assert (got.logits - want.logits).abs().max() <= 1e-6
    assert torch.equal(got.deductive.G_LM, want.deductive.G_LM)
    with torch.no_grad():  # labels: transformers' convention (shifted inside), our loss
        loss = hf(ids, labels=ids).loss
    assert abs(loss.item() - pldr.masked_loss(want.logits[:, :-1], ids[:, 1:]).item()) < 1e-5
    # a left-padded batch through attention_mask equals each row alone
    pad_ids, mask = _left_padded([[103, 251, 183], [6, 89, 192, 21, 236]])
    with torch.no_grad():
        batch = hf(pad_ids, attention_mask=mask).logits
        alone = hf(torch.tensor([[103, 251, 183]])).logits
    assert_same(batch[0, 2:], alone[0], "left-padded row")  # float32: 1e-4


@pytest.mark.parametrize("use_cache, mode", [(True, "kv_g"), (False, "no_cache")])
def test_greedy_generate_on_a_left_padded_batch_equals_pldr_generate(model_dir, use_cache, mode):
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    ids, mask = _left_padded(PROMPTS)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      use_cache=use_cache, eos_token_id=None)
    want = pldr.generate(pldr.load_model(model_dir), PROMPTS, 10, cache=mode, temperature=0,
                         eos_id=-1)
    assert out[:, ids.shape[1]:].tolist() == want


def test_sampling_generate_runs_and_is_seeded(model_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    ids, mask = _left_padded(PROMPTS[:2])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                do_sample=True, top_p=0.9, eos_token_id=None))
    assert runs[0].shape == (2, ids.shape[1] + 6) and torch.equal(runs[0], runs[1])


def test_cache_is_ours_and_decodes_like_kv_g(model_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    t1, t2 = pldr.generate(hf.pldr_model, [[5, 6, 7]], 2, temperature=0, eos_id=-1)[0]
    with torch.no_grad():
        out = hf(torch.tensor([[5, 6, 7]]), use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, PLDRCache) and cache.get_seq_length() == 3
        assert out.logits[0, -1].argmax().item() == t1
        step = hf(torch.tensor([[t1]]), past_key_values=cache, attention_mask=torch.ones(1, 4))
    assert cache.get_seq_length() == 4 and step.logits.shape == (1, 1, 300)
    assert step.logits[0, -1].argmax().item() == t2


def test_tokenizer_follows_the_papers_conventions(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    ours = pldr.Tokenizer.load(model_dir / "tokenizer.model")
    assert isinstance(tok, PLDRTokenizer)
    for text in ("the cat sat", "the  dog\nsat", " a list"):
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text, eos=False)  # no BOS, no EOS for prompts
        assert tok.decode(ids + [3], skip_special_tokens=True) == ours.decode(ids + [3])
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 3, 2)
    assert tok.padding_side == "left"


def test_text_generation_pipeline_produces_text(model_dir):
    pipe = pipeline("text-generation", model=str(model_dir))
    out = pipe(["the cat", "a list is the dog"], max_new_tokens=6, do_sample=False, batch_size=2)
    texts = [o[0]["generated_text"] for o in out]
    assert texts[0].startswith("the cat") and len(texts[0]) > len("the cat")
    assert texts[1].startswith("a list is the dog")


def test_save_and_load_round_trip_through_both_apis(model_dir, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    hf.save_pretrained(tmp_path / "by_hf")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "by_hf")
    saved = json.loads((tmp_path / "by_hf" / "config.json").read_text())
    assert saved["model_type"] == "pldr_llm"
    back = pldr.load_model(tmp_path / "by_hf")  # what transformers wrote, read by pldr
    ours = pldr.load_model(model_dir)
    assert back.config == ours.config
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in back.state_dict().items())
    assert back.state_dict().keys() == ours.state_dict().keys()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "by_hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "by_hf")("the cat")["input_ids"] == \
        pldr.Tokenizer.load(model_dir / "tokenizer.model").encode("the cat", eos=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(again(ids).logits, ours(ids).logits)


def test_a_v510G_model_and_a_wrapped_model(tmp_path):
    ours = pldr.load_model(PORT)
    g = pldr.to_v510G(ours, pldr.infer_G_LM(ours, torch.tensor([5, 6, 7, 8])))
    g.save_pretrained(tmp_path / "g")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    ids = torch.tensor([[9, 10, 11]])
    assert torch.equal(hf(ids).logits, g(ids).logits)
    wrapped = PLDRForCausalLM.from_pldr(ours)  # shares the weights, no copy
    assert wrapped.final_layer.weight is ours.final_layer.weight
    assert torch.equal(wrapped(ids).logits, ours(ids).logits)
