"""Faces of pldr for other libraries: transformers (`hf.py`) and lm-eval; each imported on demand, as they need their library."""
