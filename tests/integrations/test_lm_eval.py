"""The lm-eval model `pldr`: offline on a local multiple-choice task written here, every
per-choice log-likelihood equals the one computed directly from the model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pldr
import pldr.lm_eval  # noqa: F401  registers "pldr"
from pldr import PLDRConfig, PLDRModel, generate, load_model, save_G_LM
from pldr.cli import main
from pldr.data.tokenizer import Tokenizer
from pldr.integrations.lm_eval import PLDRLM

QUESTIONS = [
    ("The class statement defines", ["a new class", "a loop", "nothing at all"], 0),
    ("A for loop iterates over", ["the items of a sequence", "the moon", "a class"], 0),
    ("Exceptions are raised with", ["the raise statement", "a comment", "an import"], 0),
    ("The import statement loads", ["a module", "a number", "the keyboard"], 0),
    ("A function is defined with", ["def", "class", "while"], 0),
    ("Strings are written between", ["quotes", "numbers", "classes"], 0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("lmeval")
    tok = Tokenizer.train([topics[k] for k in sorted(topics)[:60]], 400, str(root / "tok"))
    torch.manual_seed(0)
    cfg = PLDRConfig.preset("tiny").replace(vocab_size=tok.vocab_size, num_layers=1,
                                            max_seq_len=32)
    PLDRModel(cfg).save_pretrained(root / "model", tokenizer=tok)
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(f"""task: pldr_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return SimpleNamespace(root=root, model_dir=root / "model", tasks=tasks, tok=tok,
                           model=load_model(root / "model"))


def _direct(model, tok, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | context), straight from the model, one row."""
    ctx = tok.encode(context, eos=False)
    whole = tok.encode(context + continuation, eos=False)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0]
    logp = F.log_softmax(logits.double(), -1)[len(ctx) - 1:]
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def _evaluate(setup, batch_size):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(setup.tasks), include_defaults=False)
    lm = PLDRLM(str(setup.model_dir), batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=["pldr_toy_mc"], task_manager=manager,
                                   log_samples=True)


def test_simple_evaluate_scores_every_choice_as_the_model_does(setup):
    out = _evaluate(setup, 8)
    samples = out["samples"]["pldr_toy_mc"]
    assert len(samples) == len(QUESTIONS)
    for s in samples:
        q, choices, _ = QUESTIONS[s["doc_id"]]
        got = [r[0][0] for r in s["resps"]]
        want = [_direct(setup.model, setup.tok, q, " " + c) for c in choices]
        assert got == pytest.approx(want, abs=1e-5)
    assert 0.0 <= out["results"]["pldr_toy_mc"]["acc,none"] <= 1.0


def test_lm_evals_own_models_stay_registered_beside_pldr():
    from lm_eval.api.registry import get_model

    assert get_model("pldr") is PLDRLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"  # pldr serve's client


def test_batch_size_1_equals_batch_size_8(setup):
    one = _evaluate(setup, 1)["samples"]["pldr_toy_mc"]
    eight = _evaluate(setup, 8)["samples"]["pldr_toy_mc"]
    for a, b in zip(sorted(one, key=lambda s: s["doc_id"]), sorted(eight, key=lambda s: s["doc_id"])):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]],
                                                               abs=1e-5)


def test_loglikelihood_rolling_sums_the_windowed_token_log_probabilities(setup):
    lm = PLDRLM(str(setup.model_dir), batch_size=4)
    text = " ".join(q for q, _, _ in QUESTIONS)  # longer than the 32-token context
    t = setup.tok.encode(text, eos=False)
    W = setup.model.config.max_seq_len
    assert len(t) > 2 * W
    shifted = [setup.model.config.eos_id] + t  # shifted[i] is the token before t[i]
    want, start = 0.0, 0
    while start < len(t):
        end = min(start + W, len(t))
        inp = shifted[max(0, end - W):end]  # the W inputs ending right before t[end]
        with torch.no_grad():
            logp = F.log_softmax(setup.model(torch.tensor([inp])).logits[0].double(), -1)
        rows = logp[len(inp) - (end - start):]
        want += rows.gather(-1, torch.tensor(t[start:end])[:, None]).sum().item()
        start = end
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_at_its_stop_string(setup):
    lm = PLDRLM(str(setup.model_dir))
    prompt = "The class statement"
    ids = generate(setup.model, [setup.tok.encode(prompt, eos=False)], 12, temperature=0)[0]
    full = setup.tok.decode(ids)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    got = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop],
                                                            "max_gen_toks": 12}))])[0]
    assert got == full[:full.index(stop)]
    assert lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\x00never"],
                                                             "max_gen_toks": 12}))])[0] == full


def test_a_predefined_G_LM_is_used_for_every_request(setup):
    cfg = setup.model.config
    eye = [torch.eye(cfg.dk).expand(1, cfg.num_heads, cfg.dk, cfg.dk).clone()
           for _ in range(cfg.num_layers)]
    plain = PLDRLM(str(setup.model_dir))
    fixed = PLDRLM(str(setup.model_dir), G_LM=eye)
    req = [SimpleNamespace(args=("The class statement defines", " a new class"))]
    a, b = plain.loglikelihood(req)[0][0], fixed.loglikelihood(req)[0][0]
    assert a != pytest.approx(b, abs=1e-6)
    g_model = pldr.to_v510G(setup.model, eye)
    ctx, whole = (setup.tok.encode(s, eos=False) for s in ("The class statement defines",
                                                           "The class statement defines a new class"))
    with torch.no_grad():
        logp = F.log_softmax(g_model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    want = logp[len(ctx) - 1:].gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()
    assert b == pytest.approx(want, abs=1e-5)


def test_pldr_eval_offline_prints_the_table_and_writes_json(setup, tmp_path, capsys):
    cfg = setup.model.config
    eye = [torch.eye(cfg.dk).expand(1, cfg.num_heads, cfg.dk, cfg.dk).clone()
           for _ in range(cfg.num_layers)]
    save_G_LM(eye, tmp_path / "eye.safetensors")
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(setup.model_dir), "--tasks", "pldr_toy_mc",
                 "--include-path", str(setup.tasks), "--G-LM", str(tmp_path / "eye.safetensors"),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("pldr_toy_mc") >= 2 and "v510Gi" in printed
    report = json.loads(out.read_text())
    assert set(report) == {"model", "G_LM"}
    assert "acc,none" in report["model"]["results"]["pldr_toy_mc"]


def test_lm_evals_results_table_prints_its_own_headers():
    """lm-eval's make_table (what `pldr eval` and `lm_eval` print) sets the writer's
    `headers`; a pytablewriter that ignores them prints `A | B | C ...` instead."""
    from lm_eval.utils import make_table

    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.25,
                                        "acc_stderr,none": 0.0125}},
               "versions": {"arc_easy": 1.0}, "n-shot": {"arc_easy": 0},
               "higher_is_better": {"arc_easy": {"acc": True}}}
    header, rule, row = make_table(results).strip().splitlines()
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    assert set(rule) <= set("|-:") and "0.25" in row and "0.0125" in row


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "no_such_task"], "task 'no_such_task' does not exist"),
    (["--tasks", "pldr_toy_mc", "--batch-size", "0"], "--batch-size"),
])
def test_pldr_eval_bad_input_is_one_line(setup, capsys, extra, message):
    assert main(["eval", "--model", str(setup.model_dir), "--include-path", str(setup.tasks),
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(setup, tmp_path):
    from pydoc_data.topics import topics

    big = Tokenizer.train([topics[k] for k in sorted(topics)[:80]], 600, str(tmp_path / "big"))
    with pytest.raises(pldr.PLDRError, match="do not belong together"):
        PLDRLM(str(setup.model_dir), tokenizer=big.path)


# ----- pldr's task groups ---------------------------------------------------------------------

# lm-eval's task folders that hold the groups' tasks: indexing these instead of all of
# lm-eval's (about a minute) keeps the test fast; a task missing from them fails it
TASK_FOLDERS = ("arc", "hellaswag", "openbookqa", "piqa", "siqa", "winogrande", "truthfulqa",
                "tinyBenchmarks")
GROUPS = {
    "pldr_zeroshot": {"arc_easy": 0, "arc_challenge": 0, "hellaswag": 0, "openbookqa": 0,
                      "piqa": 0, "social_iqa": 0, "winogrande": 0, "truthfulqa_mc2": 0},
    "pldr_tiny": {"tinyArc": 25, "tinyMMLU": 0, "tinyWinogrande": 5, "tinyHellaswag": 10,
                  "tinyTruthfulQA": 0},
}


@pytest.fixture
def offline_tasks(monkeypatch):
    """lm-eval builds its Task objects from their full configs, but without downloading
    their datasets and without importing the `!function`s of their YAMLs (tinyBenchmarks'
    need a package of their own): what a group expands to, offline."""
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask, TaskConfig
    from lm_eval.tasks import _factory, _yaml_loader

    class Unloaded(ConfigurableTask):
        def __init__(self, config):
            self._config = TaskConfig(**config)

    monkeypatch.setattr(_factory, "ConfigurableTask", Unloaded)
    monkeypatch.setattr(_yaml_loader, "_import_func_in_yml", lambda qual, base_dir: qual)
    return [Path(lm_eval.tasks.__file__).parent / f for f in TASK_FOLDERS]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_pldr_task_groups_expand_to_the_papers_tasks_and_shots(offline_tasks, group):
    manager = pldr.lm_eval.task_manager(offline_tasks, include_defaults=False)
    assert group in manager.all_groups
    loaded = manager.load([group])
    assert loaded["group_map"] == {group: list(GROUPS[group])}
    shots = {name: task.config.num_fewshot for name, task in loaded["tasks"].items()}
    assert shots == GROUPS[group]
    for name, task in loaded["tasks"].items():
        metrics = {m["metric"] for m in task.config.metric_list}
        assert metrics & {"acc", "acc_norm"}, (name, metrics)
        if group == "pldr_zeroshot" and name in ("arc_easy", "arc_challenge", "hellaswag",
                                                 "openbookqa", "piqa"):
            assert {"acc", "acc_norm"} <= metrics


def test_the_task_groups_are_package_data(tmp_path):
    """The YAMLs install with the package: pyproject's package data names them."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.name for pattern in data["pldr.integrations"]
               for p in (root / "src/pldr/integrations").glob(pattern)}
    assert {"pldr_zeroshot.yaml", "pldr_tiny.yaml"} <= shipped
    assert pldr.lm_eval.TASKS_DIR.is_dir()


def test_pldr_eval_finds_its_groups_without_an_include_path(setup, offline_tasks, monkeypatch,
                                                            capsys):
    """`pldr eval --tasks pldr_tiny` hands lm-eval a task manager that expands the group
    (simple_evaluate itself is replaced: it would download the datasets)."""
    import lm_eval

    from pldr.integrations import lm_eval as integration

    real = integration.task_manager
    monkeypatch.setattr(integration, "task_manager", lambda include_path=None, **kw:
                        real(list(include_path or []) + offline_tasks, include_defaults=False))
    seen = {}

    def evaluate(model, tasks, task_manager, **kw):
        seen.update(task_manager.load(tasks)["tasks"])
        return {"results": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    monkeypatch.setattr(lm_eval.utils, "make_table", lambda results: "table")
    assert main(["eval", "--model", str(setup.model_dir), "--tasks", "pldr_tiny"]) == 0
    assert sorted(seen) == sorted(GROUPS["pldr_tiny"])
