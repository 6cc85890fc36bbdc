"""`import pldr.lm_eval` registers the lm-eval model name `pldr` (see
pldr.integrations.lm_eval; needs the `eval` extra)."""

from .integrations.lm_eval import PLDRLM

__all__ = ["PLDRLM"]
