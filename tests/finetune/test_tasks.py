"""Fine-tuning data and metrics without training: encoding per task (EOS, right padding,
first-piece word labels, QA windows mapped back to text, completion-only loss) and the
metric definitions (SQuAD normalisation, seqeval entities, macro-F1)."""

from __future__ import annotations

import pytest
import torch

from pldr.errors import DataError
from pldr.finetune import metrics as M
from pldr.finetune import tasks as T
from pldr.finetune.data import ExampleBatches, Labels, find_labels, read_split
from pldr.finetune.evaluate import batch_loss

from finetune_data import qa_rows, token_rows, write_jsonl
from finetune_fixtures import base, one_thread  # noqa: F401  (fixtures)


def table(tmp_path, rows, name="rows.jsonl"):
    return read_split(write_jsonl(tmp_path / name, rows), "train")


def test_sequence_rows_end_with_eos_and_batches_pad_on_the_right(base, tmp_path):
    tok = base["tokenizer"]
    t = table(tmp_path, [{"text": "the value", "label": 1}, {"text": "a", "label": 0}])
    data = T.encode_sequence(t, T.columns_of("sequence-classification", {}), tok, 64,
                             {"0": 0, "1": 1}, 2, "rows")
    assert [e.ids[-1] for e in data.examples] == [tok.eos_id] * 2
    assert data.examples[0].ids[:-1] == tok.encode("the value", eos=False)
    batch = T.collate("sequence-classification", data.examples, pad_id=0)
    n0, n1 = len(data.examples[0].ids), len(data.examples[1].ids)
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["ids"][1, n1:].eq(0).all() and batch["attention_mask"][1, :n1].eq(1).all()
    assert batch["labels"].tolist() == [1, 0]


def test_a_words_tag_sits_on_its_first_piece_and_minus_100_on_the_rest(base, tmp_path):
    tok = base["tokenizer"]
    rows = [{"tokens": ["Alice", "subscript", "Chen"], "ner_tags": ["B-PER", "O", "B-PER"]}]
    t = table(tmp_path, rows)
    cols = T.columns_of("token-classification", {})
    labels = find_labels("token-classification", t, cols, None, None)
    assert labels.names == ("B-PER", "O")  # names from the data, sorted
    data = T.encode_tokens(t, cols, tok, 64, labels.label2id, 2, "rows")
    e = data.examples[0]
    pieces = [tok.encode(w, eos=False) for w in rows[0]["tokens"]]
    assert e.ids == sum(pieces, []) + [tok.eos_id]
    expect = []
    for piece, tag in zip(pieces, [0, 1, 0]):
        expect += [tag] + [T.IGNORE] * (len(piece) - 1)
    assert e.labels == expect + [T.IGNORE]
    assert e.words == [0, len(pieces[0]), len(pieces[0]) + len(pieces[1])]
    assert data.gold == [["B-PER", "O", "B-PER"]]


def test_qa_windows_overlap_by_the_stride_and_hold_the_answer_span(base, tmp_path):
    tok = base["tokenizer"]
    rows = qa_rows(6, 3)
    rows[0]["context"] = "the value of the subscript must " * 6 + rows[0]["context"]
    shift = len("the value of the subscript must " * 6)
    rows[0]["answers"]["answer_start"] = [rows[0]["answers"]["answer_start"][0] + shift]
    t = table(tmp_path, rows)
    data = T.encode_qa(t, T.columns_of("question-answering", {}), tok, 32, 8, "rows")
    windows = [e for e in data.examples if e.row == 0]
    assert len(windows) > 1
    q = len(tok.encode("who", eos=False))
    for a, b in zip(windows, windows[1:]):  # consecutive windows share 8 context pieces
        assert a.spans[-9:-1] == b.spans[q:q + 8]
    for e in data.examples:
        assert len(e.ids) <= 32 and e.ids[-1] == tok.eos_id
        if e.start:  # a window holding the answer: its pieces spell the answer
            ctx = data.contexts[e.row]
            text = ctx[e.spans[e.start][0]:e.spans[e.end][1]].strip()
            assert text == data.gold[e.row][0]
    assert any(e.start for e in windows)


def test_causal_loss_counts_completion_targets_only(base, tmp_path):
    tok, config = base["tokenizer"], base["config"]
    import pldr

    torch.manual_seed(0)
    model = pldr.PLDRModel(config)
    rows = [{"prompt": "the value of", "completion": " the subscript"},
            {"prompt": "a", "completion": " must be"}]
    t = table(tmp_path, rows)
    data = T.encode_causal(t, T.columns_of("causal", {}), tok, 64, "rows")
    batch = T.collate("causal", data.examples, pad_id=0)
    loss, _, _ = batch_loss("causal", model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    for r, e in enumerate(data.examples):  # every prompt position's label changes
        changed["labels"][r, :e.start] = torch.randint(4, config.vocab_size, (e.start,))
    assert batch_loss("causal", model, changed)[0].item() == loss.item()
    e = data.examples[0]
    changed["labels"][0, e.start + 1] = (changed["labels"][0, e.start + 1] + 1) % 500 + 4
    assert batch_loss("causal", model, changed)[0].item() != loss.item()
    assert T.loss_items("causal", batch) == sum(len(e.ids) - e.start for e in data.examples)


def test_bad_rows_are_one_line_errors_that_name_the_row(base, tmp_path):
    tok = base["tokenizer"]
    seq = T.columns_of("sequence-classification", {})
    with pytest.raises(DataError, match=r"row 1 of rows: label 5 is outside the 2 labels"):
        T.encode_sequence(table(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 5}]),
                          seq, tok, 64, {}, 2, "rows")
    with pytest.raises(DataError, match="has no column 'label'.*`label_column`$"):
        T.check_columns(table(tmp_path, [{"text": "a", "y": 0}]), seq, "rows")
    tc = T.columns_of("token-classification", {})
    with pytest.raises(DataError, match="row 0 of rows: 2 words but 1 tags"):
        T.encode_tokens(table(tmp_path, [{"tokens": ["a", "b"], "ner_tags": [0]}]), tc, tok,
                        64, {}, 2, "rows")
    rows = qa_rows(2, 0)
    rows[1]["answers"]["answer_start"] = [len(rows[1]["context"])]
    with pytest.raises(DataError, match="row 1 of rows: the answer .* falls outside its context"):
        T.encode_qa(table(tmp_path, rows), T.columns_of("question-answering", {}), tok, 64, 8,
                    "rows")


def test_token_rows_label_names_come_from_a_classlabel_feature(tmp_path):
    import datasets

    rows = token_rows(4, 0)
    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(
                                   names=["O", "B-PER", "I-PER"]))})
    ds = datasets.Dataset.from_list(
        [{"tokens": r["tokens"], "ner_tags": [["O", "B-PER"].index(t) for t in r["ner_tags"]]}
         for r in rows], features=feats)
    labels = find_labels("token-classification", ds, T.columns_of("token-classification", {}),
                         None, None)
    assert labels == Labels(("O", "B-PER", "I-PER"))


def test_the_loader_resumes_at_any_batch_and_splits_ranks():
    examples = [T.Example([i + 4], i) for i in range(10)]
    one = ExampleBatches(examples, 4, seed=3)
    seen = [[e.row for e in b] for _ in range(2) for b in one]
    again = ExampleBatches(examples, 4, seed=3)
    it = iter(again)
    first = [e.row for e in next(it)]
    state = again.state_dict()
    resumed = ExampleBatches(examples, 4, seed=3)
    resumed.load_state_dict(state)
    assert [first] + [[e.row for e in b] for b in resumed] == seen[:2]
    halves = [ExampleBatches(examples, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [[e.row for e in a] + [e.row for e in b] for a, b in zip(*halves)] == seen[:2]


def test_squad_normalisation_and_scores():
    assert M.normalize_answer("The  Cat's, a hat!") == "cats hat"
    assert M.squad_metrics([["the cat"], ["red fox", "fox"]], ["Cat", "a red dog"]) == {
        "exact_match": 50.0, "f1": 100.0 * (1.0 + 0.5) / 2}
    assert M.token_f1("x b c", "b c d") == pytest.approx(2 / 3)  # "a" would be an article


def test_entity_and_classification_metrics():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]  # the PER span is cut short: not an entity match
    figures = M.entity_metrics(gold, pred)
    assert figures["precision"] == 0.5 and figures["recall"] == 0.5 and figures["f1"] == 0.5
    assert figures["accuracy"] == 0.75
    c = M.classification_metrics([0, 0, 1, 2], [0, 1, 1, 2])
    assert c["accuracy"] == 0.75
    assert c["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert M.perplexity(0.0) == 1.0 and not M.higher_is_better("perplexity")


def test_errors_about_the_evaluation_source_name_eval_data(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="^`data` path") as err:
        read_split(missing, "train")
    assert err.value.param == "data"
    with pytest.raises(DataError, match=r"^`eval_data` path '.*missing.jsonl' does not") as err:
        read_split(missing, "train", param="eval_data")
    assert err.value.param == "eval_data"
