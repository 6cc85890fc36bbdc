"""Faces of pldr in other tools: `hf.py` (transformers classes; `import pldr.hf`) and
`lm_eval.py` (the lm-eval model `pldr`; `import pldr.lm_eval`). Each imports its library
only when used (extras `hf`, `eval`)."""
