"""Faces of pldr in other tools: `lm_eval.py` (the lm-eval model `pldr`); the transformers
classes live in `hf.py`. Each imports its tool only when used (extras `eval`, `hf`)."""
