"""The lm-eval model `pldr`: zero-shot and few-shot scores of a PLDR-LLM with lm-eval 0.4.

    import pldr.lm_eval   # registers the model name "pldr"
    lm_eval.simple_evaluate(model="pldr", model_args="pretrained=DIR,G_LM=FILE", tasks=[...])

The papers' suites ship as lm-eval groups in `TASKS_DIR` (pldr_zeroshot, pldr_tiny); the task
manager of `task_manager()` finds them beside lm-eval's own tasks:

    lm_eval.simple_evaluate(model="pldr", model_args="pretrained=DIR", tasks=["pldr_zeroshot"],
                            task_manager=pldr.lm_eval.task_manager())

Requests are scored in batches sorted by length, right-padded with the pad id and given the
matching `attention_mask`, so a row scores the same alone or in a batch. A full forward sums
the metric tensor A over the row's real tokens, context and continuation together, as the
architecture does (docs/evaluation.md). `G_LM=` (a predefined G_LM file or list) is used for every
request: the paper's v510Gi ablation and negative tests. Texts are encoded as the paper's
tokenizer does for prompts: no BOS and no EOS; the EOS id stands in for the empty context.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint.glm import load_G_LM
from ..checkpoint.load import load_model
from ..data.tokenizer import Tokenizer
from ..devices import resolve_device
from ..errors import PLDRError, missing_extra
from ..inference.generate import generate
from ..model.cache import GivenG, InferenceCache

try:
    # lm-eval registers its own models (hf, local-completions, ...) on first lookup only while
    # its registry is empty: import them now, or registering "pldr" first would hide them
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(str(missing_extra("pldr.lm_eval", "eval", e.name))) from None


# lm-eval group YAMLs installed with pldr (package data): the papers' evaluation suites
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
TASK_GROUPS = ("pldr_zeroshot", "pldr_tiny")


def task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 *, include_defaults: bool = True, **kwargs: Any) -> "TaskManager":
    """lm-eval's TaskManager with pldr's task groups (`TASKS_DIR`) on its include path,
    before `include_path` (a folder or a list of folders of your own task YAMLs, which win
    on a name clash). `include_defaults=False` leaves out lm-eval's own tasks (indexing them
    takes a while), which the groups are made of."""
    if isinstance(include_path, (str, os.PathLike)):
        include_path = [include_path]
    paths = [str(TASKS_DIR)] + [str(p) for p in include_path or ()]
    return TaskManager(include_path=paths, include_defaults=include_defaults, **kwargs)


@register_model("pldr")
class PLDRLM(TemplateLM):
    """A PLDR-LLM as an lm-eval model. `pretrained`: a model directory (or an original .pth
    with `config=`); `tokenizer`: a SentencePiece file (default: the directory's)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, config: str | None = None,
                 G_LM: Any = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str | None = None, max_batch_size: int | None = None, **unused: Any):
        super().__init__()
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 8
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise PLDRError(f"batch_size must be an integer, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise PLDRError(f"batch_size must be >= 1, got {self.batch_size}")
        if not os.path.exists(pretrained):  # before the tokenizer look-up, which would blame it
            raise PLDRError(f"model {pretrained!r} does not exist; check the path")
        tok_file = Tokenizer.find(tokenizer or pretrained)
        if tok_file is None:
            raise PLDRError(f"no tokenizer for {pretrained!r}: pass tokenizer=FILE.model")
        self.tok = Tokenizer.load(tok_file)
        self.model = load_model(pretrained, config, device=resolve_device(device), dtype=dtype)
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise PLDRError(f"the tokenizer has {self.tok.vocab_size} pieces but the model only "
                            f"{self.model.config.vocab_size}: they do not belong together")
        G_LM = load_G_LM(G_LM) if isinstance(G_LM, str) else G_LM
        self.G_LM = None if G_LM is None else GivenG.check(G_LM, self.model.config)

    # ----- what TemplateLM asks for ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tok.encode(string, eos=False)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kw) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), is the continuation greedy) per request."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[-len(continuation):], len(continuation)))
        return self._score_batches(rows)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of max_seq_len tokens."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.max_length, 1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first stop string."""
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            max_new = max(1, min(max_new, self.max_length - 1))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            prompt = self.tok_encode(context)[-(self.max_length - max_new + 1):] or \
                [self.eot_token_id]
            ids = generate(self.model, [prompt], max_new, temperature=temperature if sample
                           else 0.0, G_LM=self.G_LM)[0]
            text = self.tok_decode(ids)
            cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
            out.append(text[:min(cuts)] if cuts else text)
        return out

    # ----- scoring ------------------------------------------------------------------------------

    def _score_batches(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """Longest first, `batch_size` rows at a time, right-padded."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, r in zip(chunk, self._score_rows([rows[i] for i in chunk])):
                results[i] = r
        return results  # type: ignore[return-value]

    def _score_rows(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        model, pad = self.model, self.model.config.pad_id
        width = max(len(inp) for inp, _, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (inp, _, _) in enumerate(rows):
            ids[b, :len(inp)] = torch.tensor(inp)
            mask[b, :len(inp)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = self._forward(ids, mask)                                 # [B, T, V]
        logp = F.log_softmax(logits.float(), dim=-1)
        out = []
        for b, (inp, target, n) in enumerate(rows):
            span = logp[b, len(inp) - n:len(inp)]                          # [n, V]
            want = torch.tensor(target, device=span.device)
            score = span.gather(-1, want[:, None]).sum().item()
            out.append((score, bool((span.argmax(-1) == want).all())))
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of a right-padded batch; with a predefined G_LM, through a cache without KV
        part that holds it for every row (the metric learner then does not run)."""
        cache = None
        if self.G_LM is not None:
            cache = InferenceCache.for_mode(self.model.config, "no_cache", ids.shape[0], 0,
                                            ids.device, self.model.dtype)
            cache.set_G_LM(self.G_LM)
        return self.model(ids, attention_mask=mask, cache=cache).logits
