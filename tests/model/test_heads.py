"""Task heads (pldr.model.heads): shapes, pooling under left and right padding, the losses of
each problem type against torch's definitions, saving and loading, and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import pldr
from pldr import CheckpointError, PLDRConfig, PLDRError, load_model
from pldr.model.heads import question_answering_input

LABELS = {0: "neg", 1: "neu", 2: "pos"}


def _config(**changes) -> PLDRConfig:
    """A very small model with three labels, so a forward takes milliseconds."""
    base = PLDRConfig(num_layers=1, d_model=32, num_heads=2, dff=48, num_reslayerA=1,
                      num_denseA=1, A_dff=16, vocab_size=64, max_seq_len=32)
    return base.replace(**{"id2label": LABELS, **changes})


def _model(cls, dtype=torch.float64, **changes):
    torch.manual_seed(0)
    return cls(_config(**changes)).to(dtype).eval()


def _ids(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (B, T), generator=g)


# ----- shapes, parameter names ------------------------------------------------------------------

def test_heads_have_the_ports_parameter_names_and_output_shapes():
    ids = _ids()
    seq = _model(pldr.PLDRForSequenceClassification)
    tok = _model(pldr.PLDRForTokenClassification)
    qa = _model(pldr.PLDRForQuestionAnswering)
    causal_keys = set(pldr.PLDRModel(_config()).state_dict()) - {"final_layer.weight",
                                                                 "final_layer.bias"}
    assert set(seq.state_dict()) == causal_keys | {"score.weight"}
    assert set(tok.state_dict()) == causal_keys | {"score.weight", "score.bias"}
    assert set(qa.state_dict()) == causal_keys | {"qa_outputs.weight", "qa_outputs.bias"}
    assert seq(ids).logits.shape == (3, 3) and seq(ids).loss is None
    assert tok(ids).logits.shape == (3, 9, 3)
    out = qa(ids)
    assert out.start_logits.shape == out.end_logits.shape == (3, 9)
    # the decoder is the causal model's: same hidden states for the same weights
    causal = pldr.PLDRModel(_config()).double().eval()
    causal.decoder.load_state_dict(seq.decoder.state_dict())
    assert torch.equal(causal(ids).hidden, seq(ids).hidden)


# ----- pooling ---------------------------------------------------------------------------------

def test_sequence_pooling_takes_the_last_real_token_under_left_and_right_padding():
    model = _model(pldr.PLDRForSequenceClassification)
    ids = _ids(B=2, T=6)
    alone = model(ids).logits
    right = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    left = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    for padded, pool in ((right, [5, 5]), (left, [8, 8])):
        mask = padded != 0
        for out in (model(padded, mask), model(padded)):  # the mask, or the pad id
            assert out.pool_index.tolist() == pool
            torch.testing.assert_close(out.logits, alone, rtol=0, atol=1e-10)


def test_the_attention_mask_decides_where_a_row_ends_not_the_pad_id():
    model = _model(pldr.PLDRForSequenceClassification)
    ids = _ids(B=1, T=8)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # real ids after the end, masked out: the mask wins
    out = model(ids, mask)
    assert out.pool_index.tolist() == [4]
    torch.testing.assert_close(out.logits, model(ids[:, :5]).logits, rtol=0, atol=1e-10)


# ----- losses ------------------------------------------------------------------------------------

def test_sequence_losses_follow_the_problem_type():
    ids = _ids()
    single = _model(pldr.PLDRForSequenceClassification)
    labels = torch.tensor([0, 2, 1])
    out = single(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    multi = _model(pldr.PLDRForSequenceClassification)
    targets = torch.tensor([[1., 0., 1.], [0., 0., 1.], [1., 1., 0.]], dtype=torch.float64)
    out = multi(ids, labels=targets)  # float labels, problem_type None: multi label
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))
    reg = _model(pldr.PLDRForSequenceClassification, num_labels=1, id2label=None)
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    out = reg(ids, labels=values)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], values))
    fixed = _model(pldr.PLDRForSequenceClassification, problem_type="regression")
    out = fixed(ids, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, targets))


def test_token_loss_ignores_minus_100_and_qa_loss_averages_start_and_end():
    ids = _ids()
    tok = _model(pldr.PLDRForTokenClassification)
    labels = torch.randint(0, 3, ids.shape)
    labels[:, ::2] = -100
    out = tok(ids, labels=labels)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    qa = _model(pldr.PLDRForQuestionAnswering)
    start, end = torch.tensor([1, 4, 20]), torch.tensor([2, 6, 30])  # row 2: outside, ignored
    out = qa(ids, start_positions=start, end_positions=end)
    want = (F.cross_entropy(out.start_logits[:2], start[:2])
            + F.cross_entropy(out.end_logits[:2], end[:2])) / 2
    torch.testing.assert_close(out.loss, want)


def test_token_dropout_is_on_in_training_only():
    tok = _model(pldr.PLDRForTokenClassification, classifier_dropout=0.5)
    ids = _ids()
    assert torch.equal(tok(ids).logits, tok(ids).logits)
    tok.train()
    assert not torch.equal(tok(ids).logits, tok(ids).logits)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 3, 1]), "label 3, outside \\[0, num_labels=3\\)"),
    (torch.tensor([0, 1]), "labels must have shape \\[3\\]"),
    (torch.tensor([0.0, 1.0, 2.0]), "multi-label labels must have shape"),
])
def test_bad_labels_are_one_line_errors(labels, message):
    with pytest.raises(PLDRError, match=message):
        _model(pldr.PLDRForSequenceClassification)(_ids(), labels=labels)


# ----- config, saving, loading -------------------------------------------------------------------

def test_config_labels_round_trip_and_follow_each_other():
    c = _config(problem_type="single_label_classification", classifier_dropout=0.2)
    assert c.num_labels == 3 and c.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert PLDRConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.replace(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert "id2label" not in PLDRConfig.preset("tiny").to_dict()  # causal configs unchanged
    with pytest.raises(pldr.ConfigError, match="id2label has ids \\[0, 1\\] but num_labels is 3"):
        dataclasses.replace(c, id2label={0: "a", 1: "b"})  # the fields, not `replace`'s help
    with pytest.raises(pldr.ConfigError, match="problem_type"):
        c.replace(problem_type="ranking")


@pytest.mark.parametrize("cls", [pldr.PLDRForSequenceClassification,
                                 pldr.PLDRForTokenClassification, pldr.PLDRForQuestionAnswering])
def test_save_pretrained_and_load_model_give_the_same_head(tmp_path, cls):
    model = _model(cls, dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == [cls.__name__] and saved["id2label"]["2"] == "pos"
    back = load_model(tmp_path / "m")
    assert type(back) is cls and back.config == model.config and not back.training
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_generation_refuses_a_head_model(tmp_path):
    _model(pldr.PLDRForSequenceClassification).save_pretrained(tmp_path / "m")
    from pldr.checkpoint.load import load_for_inference

    with pytest.raises(CheckpointError, match="holds a sequence-classification model"):
        load_for_inference(tmp_path / "m")


def test_question_answering_input_layout():
    ids, start = question_answering_input([5, 6], [7, 8, 9], eos_id=3)
    assert ids == [5, 6, 7, 8, 9, 3] and ids[start] == 7


def test_gradients_reach_the_decoder_and_checkpointing_keeps_them():
    """A head trains end to end: the loss reaches the embedding and the head, and
    activation checkpointing (recomputing each layer in backward) gives the same gradients."""
    ids, labels = _ids(), torch.tensor([0, 2, 1])
    grads = []
    for checkpointed in (False, True):
        model = _model(pldr.PLDRForSequenceClassification).train()
        model.set_activation_checkpointing(checkpointed)
        model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(g is not None and g.abs().sum() > 0 for g in grads[-1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-12)


def test_a_head_on_the_meta_device_has_no_memory_until_initialised():
    with torch.device("meta"):
        model = pldr.PLDRForTokenClassification(_config(variant="v510G"))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    G = model.decoder.dec_layers[0].mha1.G_LM  # v510G: identity per head
    assert torch.equal(G, torch.eye(16).expand_as(G)) and model.score.bias.abs().sum() == 0
