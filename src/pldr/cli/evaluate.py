"""`pldr eval`: lm-eval tasks on a PLDR-LLM, offline on local YAML tasks or with lm-eval's
own (which download their data unless it is cached)."""

from __future__ import annotations

import argparse

from ..devices import SUPPORTED_DTYPES
from ..errors import PLDRError, missing_extra
from ..finetune.tasks import TASKS
from .common import add_model_args
from .finetune import COLUMN_FLAGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on lm-eval tasks, or a fine-tuned model "
                       "on a labelled split",
                       description="With --tasks: runs lm-eval's simple_evaluate with the "
                       "model `pldr` and prints its results table; with --G-LM the v510Gi "
                       "ablation (that G_LM for every request) is scored beside the model "
                       "itself. With --task: scores a fine-tuned model on labelled rows "
                       "(--data) with the task's metrics (accuracy and macro-F1, entity "
                       "precision/recall/F1, SQuAD exact match/F1, perplexity) and prints "
                       "them as JSON.")
    add_model_args(p, G_LM_help="also score with this predefined G_LM for every request (v510Gi)",
                   dtypes=SUPPORTED_DTYPES)
    tasks = p.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--tasks", help="comma-separated lm-eval task or group names: "
                       "pldr_zeroshot (the paper's 0-shot suite), pldr_tiny (its "
                       "tinyBenchmarks set), or lm-eval's own, e.g. arc_easy,piqa")
    tasks.add_argument("--task", choices=TASKS, help="a fine-tuning task: score the model on "
                       "--data's labelled rows")
    p.add_argument("--data", metavar="SOURCE", help="with --task: .jsonl/.csv/.parquet or "
                   "hf:NAME[:CONFIG]")
    p.add_argument("--split", default=None, help="with --task: the split (default: validation "
                   "for hf: data, train for local files)")
    p.add_argument("--max-length", type=int, help="with --task: pieces per example (default: "
                   "the model's max_seq_len)")
    for role in COLUMN_FLAGS:
        p.add_argument(f"--{role}-column", metavar="NAME", help=f"with --task: the {role} "
                       "column (default: the task's, as pldr finetune)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of local task YAML files")
    p.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..files import atomic_write_text

    if args.task is not None:
        return run_task(args)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise PLDRError("--tasks names no task; e.g. --tasks arc_easy,piqa")
    if args.batch_size < 1:
        raise PLDRError("--batch-size must be >= 1")
    if args.include_path and not Path(args.include_path).is_dir():
        raise PLDRError(f"--include-path {args.include_path!r} is not a folder")
    try:
        import lm_eval
        from lm_eval.utils import make_table

        from ..integrations import lm_eval as integration
    except ImportError as e:
        raise missing_extra("pldr eval", "eval", e.name) from None
    # pldr's groups are always on the include path; lm-eval's own tasks (slow to index) only
    # when a task asked for is not one of --include-path's (the groups are made of them)
    own = [args.include_path] if args.include_path else []
    manager = integration.task_manager(own, include_defaults=False)
    if not all(t in manager.all_subtasks for t in tasks):
        manager = integration.task_manager(own)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" in {args.include_path!r}" if args.include_path else ""
        raise PLDRError(f"task {unknown[0]!r} does not exist{where}; see `lm-eval ls tasks`")
    runs = {"model": None} | ({"G_LM": args.G_LM} if args.G_LM else {})
    report = {}
    for name, G_LM in runs.items():
        lm = integration.PLDRLM(args.model, tokenizer=args.tokenizer, config=args.config, G_LM=G_LM,
                    batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=args.limit,
                                          num_fewshot=args.num_fewshot, task_manager=manager,
                                          log_samples=False)
        title = "the model" if G_LM is None else f"with G_LM = {G_LM} (v510Gi)"
        print(f"{args.model}: {title}")
        print(make_table(results))
        report[name] = {k: results[k] for k in ("results", "versions", "n-shot", "config")
                        if k in results}
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2, default=str) + "\n")
    return 0


def run_task(args: argparse.Namespace) -> int:
    """`pldr eval --task`: the fine-tuning metrics of --model on --data, as JSON."""
    import json

    from ..files import atomic_write_text
    from ..finetune.runner import score

    if not args.data:
        raise PLDRError("--task needs --data: the labelled rows to score")
    if args.batch_size < 1:
        raise PLDRError("--batch-size must be >= 1")
    split = args.split or ("validation" if args.data.startswith("hf:") else "train")
    result = score(args.task, args.model, args.data, split,
                   columns={r: getattr(args, f"{r}_column") for r in COLUMN_FLAGS},
                   tokenizer=args.tokenizer, max_length=args.max_length,
                   batch_size=args.batch_size, device=args.device)
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.output:
        atomic_write_text(args.output, text)
    return 0
