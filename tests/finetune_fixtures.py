"""Fixtures of the fine-tuning tests (a small tokenizer and a base model directory), imported
by each tests/finetune module: a conftest.py there would shadow tests/conftest.py, which other
tests import by name."""

from __future__ import annotations

import pytest
import torch

from finetune_data import NAMES, SMALL
from pldr import PLDRConfig, PLDRModel


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> dict:
    """A 512-piece tokenizer trained on a slice of the corpus and a 1-layer base model
    directory (random weights: the tasks are learnt from scratch)."""
    from pldr.data import load_documents
    from pldr.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ft_base")
    # the planted words are pieces of their own (as names are in a real tokenizer), so a
    # word's first piece already tells a name from another word
    planted = [" ".join((*NAMES, "XYZ"))] * 300
    tok = Tokenizer.train(load_documents("builtin", "train[:10%]") + planted, 512)
    config = PLDRConfig.preset("tiny").replace(**SMALL, vocab_size=tok.vocab_size)
    with torch.random.fork_rng(devices=[]):  # the same weights whichever test comes first
        torch.manual_seed(0)
        model = PLDRModel(config)
    model.save_pretrained(root / "base", tokenizer=tok)
    return {"root": root, "model": str(root / "base"), "tokenizer": tok, "config": config}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (on a busy 2-core machine, two threads were
    15x slower per step); the setting is put back after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
