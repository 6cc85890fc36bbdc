"""`import pldr.lm_eval` registers the lm-eval model name `pldr` and gives `task_manager()`, an
lm-eval TaskManager that also knows pldr's task groups pldr_zeroshot and pldr_tiny (their
YAMLs are in `TASKS_DIR`; see pldr.integrations.lm_eval; needs the `eval` extra)."""

from .integrations.lm_eval import PLDRLM, TASK_GROUPS, TASKS_DIR, task_manager

__all__ = ["PLDRLM", "TASKS_DIR", "TASK_GROUPS", "task_manager"]
