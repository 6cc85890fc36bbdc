"""pldr.hf's task heads: the Auto classes load a saved head directory and compute what the
pldr head computes; what transformers saves loads with pldr.load_model; transformers'
text-classification, token-classification and question-answering pipelines run on a saved
directory (offline, a tiny tokenizer trained here) and agree with the pldr model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pldr
import pldr.hf  # registers the heads and the question-answering pipeline
from pldr.hf import (
    PLDRHFForQuestionAnswering,
    PLDRHFForSequenceClassification,
    PLDRHFForTokenClassification,
)
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a list is a class of the cat"]
LABELS = {0: "O", 1: "NAME", 2: "PLACE"}
CASES = {  # pldr head -> (its transformers class, Auto class, pipeline task)
    pldr.PLDRForSequenceClassification: (PLDRHFForSequenceClassification,
                                         AutoModelForSequenceClassification, "text-classification"),
    pldr.PLDRForTokenClassification: (PLDRHFForTokenClassification,
                                      AutoModelForTokenClassification, "token-classification"),
    pldr.PLDRForQuestionAnswering: (PLDRHFForQuestionAnswering,
                                    AutoModelForQuestionAnswering, "question-answering"),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[type, Path]:
    """One saved directory per head (tiny random model, 300-piece tokenizer)."""
    root = tmp_path_factory.mktemp("hf_heads")
    tok = pldr.Tokenizer.train(TEXTS * 50, 300, model_type="bpe")
    config = pldr.PLDRConfig(num_layers=1, d_model=32, num_heads=2, dff=48, num_reslayerA=1,
                             num_denseA=1, A_dff=16, vocab_size=300, max_seq_len=64,
                             id2label=LABELS)
    out = {}
    for i, cls in enumerate(CASES):
        torch.manual_seed(i)
        cls(config).save_pretrained(root / cls.task, tokenizer=tok)
        out[cls] = root / cls.task
    return out


def _outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "start_logits"):
        return [out.start_logits, out.end_logits]
    return [out.logits]


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.task)
def test_auto_classes_load_a_head_directory_and_give_its_outputs(dirs, cls):
    hf_cls, auto, _ = CASES[cls]
    hf = auto.from_pretrained(dirs[cls])
    ours = pldr.load_model(dirs[cls])
    assert type(hf) is hf_cls and not hf.training and hf.config.id2label == LABELS
    ids = torch.tensor([[0, 0, 11, 52, 80, 25], [103, 251, 183, 80, 25, 140]])
    mask = (ids != 0).long()
    with torch.no_grad():
        for got, want in zip(_outputs(hf(ids, attention_mask=mask)), _outputs(ours(ids, mask))):
            assert torch.equal(got, want)


def test_from_pldr_wraps_a_head_without_copying_it(dirs):
    ours = pldr.load_model(dirs[pldr.PLDRForTokenClassification])
    hf = PLDRHFForTokenClassification.from_pldr(ours)
    assert hf.score is ours.score and hf.decoder is ours.decoder and not hf.training
    ids = torch.tensor([[5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.task)
def test_what_transformers_saves_loads_as_the_pldr_head(dirs, cls, tmp_path):
    hf = CASES[cls][1].from_pretrained(dirs[cls])
    hf.save_pretrained(tmp_path / "saved")
    back = pldr.load_model(tmp_path / "saved")
    ours = pldr.load_model(dirs[cls])
    assert type(back) is cls and back.config == ours.config
    sa, sb = back.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_text_classification_pipeline_appends_eos_and_pools_it(dirs):
    d = dirs[pldr.PLDRForSequenceClassification]
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.add_eos_token and tok("the cat")["input_ids"][-1] == 3  # as fine-tuned
    clf = pipeline("text-classification", model=str(d))
    text = "the cat sat on the mat"
    ids = torch.tensor([pldr.Tokenizer.load(d / "tokenizer.model").encode(text)])  # + EOS
    with torch.no_grad():
        probs = pldr.load_model(d)(ids).logits[0].softmax(-1)
    got = {r["label"]: r["score"] for r in clf(text, top_k=None)}
    assert got == pytest.approx({LABELS[i]: float(p) for i, p in enumerate(probs)}, abs=1e-6)


def test_token_classification_pipeline_labels_each_piece_but_eos(dirs):
    d = dirs[pldr.PLDRForTokenClassification]
    ner = pipeline("token-classification", model=str(d), ignore_labels=[])
    text = "the dog sat on the log"
    ids = pldr.Tokenizer.load(d / "tokenizer.model").encode(text)
    assert ids[-1] == 3
    want = pldr.load_model(d)(torch.tensor([ids])).logits[0].argmax(-1)[:-1]  # EOS: special
    got = ner(text)
    assert [r["index"] for r in got] == list(range(len(ids) - 1))
    assert [r["entity"] for r in got] == [LABELS[int(i)] for i in want]


def test_question_answering_pipeline_returns_the_best_span_of_the_context(dirs):
    d = dirs[pldr.PLDRForQuestionAnswering]
    qa = pipeline("question-answering", model=str(d))
    question, context = "who sat", "the cat sat on the mat"
    got = qa(question=question, context=context, max_answer_len=3)
    assert got["answer"] == context[got["start"]:got["end"]] and got["answer"]
    # the same span by brute force over our model's logits
    sp = pldr.Tokenizer.load(d / "tokenizer.model")
    q, c = sp.encode(question, eos=False), sp.encode(context, eos=False)
    with torch.no_grad():
        out = pldr.load_model(d)(torch.tensor([q + c + [3]]))
    start = out.start_logits[0, len(q):len(q) + len(c)].log_softmax(-1)
    end = out.end_logits[0, len(q):len(q) + len(c)].log_softmax(-1)
    best = max(((s, e) for s in range(len(c)) for e in range(s, min(s + 3, len(c)))),
               key=lambda se: float(start[se[0]] + end[se[1]]))
    assert got["score"] == pytest.approx(float((start[best[0]] + end[best[1]]).exp()), rel=1e-5)
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in c]
    assert got["answer"] == "".join(pieces[best[0]:best[1] + 1]).strip()


def test_question_answering_pipeline_needs_both_texts(dirs):
    qa = pipeline("question-answering", model=str(dirs[pldr.PLDRForQuestionAnswering]))
    with pytest.raises(pldr.PLDRError, match="question= and context="):
        qa(question="who sat")
    with pytest.raises(pldr.PLDRError, match="not top_k"):
        qa(question="who sat", context="the cat sat", top_k=2)
