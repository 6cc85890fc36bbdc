"""`pldr eval`: lm-eval tasks on a PLDR-LLM, offline on local YAML tasks or with lm-eval's
own (which download their data unless it is cached)."""

from __future__ import annotations

import argparse

from ..devices import SUPPORTED_DTYPES
from ..errors import PLDRError, missing_extra
from .common import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model on lm-eval tasks",
                       description="Runs lm-eval's simple_evaluate with the model `pldr` and "
                       "prints its results table. With --G-LM the v510Gi ablation (that G_LM "
                       "for every request) is scored beside the model itself.")
    add_model_args(p, G_LM_help="also score with this predefined G_LM for every request (v510Gi)",
                   dtypes=SUPPORTED_DTYPES)
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. "
                   "arc_easy,arc_challenge,hellaswag,winogrande,truthfulqa_mc2,openbookqa,piqa,siqa")
    p.add_argument("--include-path", metavar="DIR", help="a folder of local task YAML files")
    p.add_argument("--limit", type=float, help="at most this many examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", metavar="FILE", help="write lm-eval's results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..files import atomic_write_text

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise PLDRError("--tasks names no task; e.g. --tasks arc_easy,piqa")
    if args.batch_size < 1:
        raise PLDRError("--batch-size must be >= 1")
    if args.include_path and not Path(args.include_path).is_dir():
        raise PLDRError(f"--include-path {args.include_path!r} is not a folder")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from ..integrations.lm_eval import PLDRLM
    except ImportError as e:
        raise missing_extra("pldr eval", "eval", e.name) from None
    manager = TaskManager(include_path=args.include_path,
                          include_defaults=args.include_path is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" in {args.include_path!r}" if args.include_path else ""
        raise PLDRError(f"task {unknown[0]!r} does not exist{where}; see `lm-eval ls tasks`")
    runs = {"model": None} | ({"G_LM": args.G_LM} if args.G_LM else {})
    report = {}
    for name, G_LM in runs.items():
        lm = PLDRLM(args.model, tokenizer=args.tokenizer, config=args.config, G_LM=G_LM,
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
