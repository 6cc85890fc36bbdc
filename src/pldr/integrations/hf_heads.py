"""The task heads (pldr.model.heads) as transformers models, for AutoModelForSequenceClassification,
AutoModelForTokenClassification and AutoModelForQuestionAnswering, and transformers'
`pipeline("text-classification" | "token-classification" | "question-answering", model=DIR)`
on a saved directory (ours, or what these classes save: the same keys).

Each wrapper's parameters are the wrapped head's own modules (`decoder` and `score` /
`dropout` / `qa_outputs`), as `PLDRForCausalLM` wraps `PLDRModel`; the forward is the head's.

transformers 5 removed its extractive question-answering pipeline; `PLDRQuestionAnsweringPipeline`
is registered under that task name again for these models: the question's pieces then the
context's then EOS (the head's input layout, `question_answering_input`), the best span of at
most `max_answer_len` context pieces by start + end logit, and its characters in the context.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    Pipeline,
    PreTrainedModel,
)
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from ..errors import PLDRError
from ..model.heads import (
    PLDRForQuestionAnswering,
    PLDRForSequenceClassification,
    PLDRForTokenClassification,
    question_answering_input,
)
from .hf import PLDRHFConfig


class _HFHead(PreTrainedModel):
    """A pldr head behind transformers' PreTrainedModel: same keys, same forward."""

    config_class = PLDRHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    head_class: ClassVar[type]

    def __init__(self, config: PLDRHFConfig):
        super().__init__(config)
        inner = self.head_class(config.to_pldr())
        for name, module in inner.named_children():  # decoder, and the head's modules
            setattr(self, name, module)
        object.__setattr__(self, "pldr_model", inner)  # shares those modules; not a copy
        self.post_init()

    @classmethod
    def from_pldr(cls, model: Any) -> "_HFHead":
        """Wrap an existing pldr head (its weights are shared, not copied)."""
        with torch.device("meta"):
            hf = cls(PLDRHFConfig.from_pldr(model.config))
        for name, module in model.named_children():
            setattr(hf, name, module)
        object.__setattr__(hf, "pldr_model", model)
        return hf.train(model.training)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The pldr head initialises itself at construction."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.decoder.embedding

    @staticmethod
    def _mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        return None if attention_mask is None else attention_mask.to(input_ids.device)


class PLDRHFForSequenceClassification(_HFHead):
    """`PLDRForSequenceClassification` for transformers (`logits` [B, num_labels])."""

    head_class = PLDRForSequenceClassification

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        out = self.pldr_model(input_ids, self._mask(input_ids, attention_mask), labels=labels)
        return SequenceClassifierOutput(loss=out.loss, logits=out.logits)


class PLDRHFForTokenClassification(_HFHead):
    """`PLDRForTokenClassification` for transformers (`logits` [B, T, num_labels])."""

    head_class = PLDRForTokenClassification

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> TokenClassifierOutput:
        out = self.pldr_model(input_ids, self._mask(input_ids, attention_mask), labels=labels)
        return TokenClassifierOutput(loss=out.loss, logits=out.logits)


class PLDRHFForQuestionAnswering(_HFHead):
    """`PLDRForQuestionAnswering` for transformers (`start_logits`, `end_logits` [B, T])."""

    head_class = PLDRForQuestionAnswering

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                **kwargs: Any) -> QuestionAnsweringModelOutput:
        out = self.pldr_model(input_ids, self._mask(input_ids, attention_mask),
                              start_positions=start_positions, end_positions=end_positions)
        return QuestionAnsweringModelOutput(loss=out.loss, start_logits=out.start_logits,
                                            end_logits=out.end_logits)


# ----- extractive question answering -----------------------------------------------------------------

class PLDRQuestionAnsweringPipeline(Pipeline):
    """`pipeline("question-answering", model=DIR)(question=..., context=...)` ->
    {"answer", "score", "start", "end"} (character offsets into the context; score = the
    start probability times the end probability, over the context's pieces)."""

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, question: str | None = None, context: str | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        if not isinstance(question, str) or not isinstance(context, str):
            raise PLDRError("the question-answering pipeline takes question= and context= "
                            "as strings")
        return super().__call__({"question": question, "context": context}, **kwargs)

    def _sanitize_parameters(self, max_answer_len: int | None = None,
                             **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise PLDRError(f"the question-answering pipeline takes question=, context= and "
                            f"max_answer_len=, not {', '.join(sorted(kwargs))}")
        if max_answer_len is not None and (isinstance(max_answer_len, bool)
                                           or not isinstance(max_answer_len, int)
                                           or max_answer_len < 1):
            raise PLDRError(f"max_answer_len must be a positive integer, got {max_answer_len!r}")
        post = {} if max_answer_len is None else {"max_answer_len": max_answer_len}
        return {}, {}, post

    def preprocess(self, inputs: dict[str, str]) -> dict[str, Any]:
        """The head's layout: question pieces, context pieces, EOS; each context piece's
        character span, from SentencePiece's byte offsets."""
        tok = self.tokenizer
        sp = getattr(tok, "sp_model", None)
        if sp is None:
            raise PLDRError(f"the question-answering pipeline needs a SentencePiece tokenizer "
                            f"(PLDRTokenizer), got {type(tok).__name__}")
        context = inputs["context"]
        question = sp.encode(inputs["question"])
        pieces = sp.encode(context, out_type="proto").pieces
        chars = _char_of_byte(context)
        spans = [(chars[p.begin], chars[p.end]) for p in pieces]
        room = self.model.config.max_seq_len - len(question) - 1
        if room < 1:
            raise PLDRError(f"the question ({len(question)} pieces) leaves no room for the "
                            f"context in {self.model.config.max_seq_len} positions")
        pieces, spans = pieces[:room], spans[:room]  # a longer context is cut off
        ids, first = question_answering_input(question, [p.id for p in pieces], tok.eos_token_id)
        return {"input_ids": torch.tensor([ids]), "first": first, "spans": spans,
                "context": context}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        out = self.model(input_ids=model_inputs["input_ids"].to(self.model.device))
        return {"start": out.start_logits[0].float().cpu(), "end": out.end_logits[0].float().cpu(),
                **{k: model_inputs[k] for k in ("first", "spans", "context")}}

    def postprocess(self, outputs: dict[str, Any], max_answer_len: int = 15) -> dict[str, Any]:
        """The best span (first <= last < first + max_answer_len) over the context pieces."""
        lo, spans = outputs["first"], outputs["spans"]
        n = len(spans)
        if n == 0:
            return {"answer": "", "score": 0.0, "start": 0, "end": 0}
        start = outputs["start"][lo:lo + n].log_softmax(-1)                  # [n]
        end = outputs["end"][lo:lo + n].log_softmax(-1)                      # [n]
        pair = start[:, None] + end[None, :]                                 # [n, n]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        pair = pair.masked_fill((j < i) | (j >= i + max_answer_len), float("-inf"))
        best = int(pair.flatten().argmax())
        s, e = divmod(best, n)
        a, b = spans[s][0], spans[e][1]
        text = outputs["context"]
        while a < b and text[a].isspace():  # SentencePiece's leading-space marker
            a += 1
        return {"answer": text[a:b], "score": float(pair[s, e].exp()), "start": a, "end": b}


def _char_of_byte(text: str) -> list[int]:
    """chars[b] = the index of the character that UTF-8 byte b of `text` belongs to (one
    more entry for the end)."""
    chars: list[int] = []
    for i, ch in enumerate(text):
        chars += [i] * len(ch.encode("utf-8"))
    return chars + [len(text)]


def register() -> None:
    """Register the three heads with their Auto classes, and the question-answering pipeline
    (idempotent)."""
    from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

    AutoModelForSequenceClassification.register(PLDRHFConfig, PLDRHFForSequenceClassification,
                                                exist_ok=True)
    AutoModelForTokenClassification.register(PLDRHFConfig, PLDRHFForTokenClassification,
                                             exist_ok=True)
    AutoModelForQuestionAnswering.register(PLDRHFConfig, PLDRHFForQuestionAnswering,
                                           exist_ok=True)
    # transformers 5 lists the task as removed (and refuses it before any registry look-up)
    REMOVED_TASKS.pop("question-answering", None)
    if "question-answering" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline("question-answering",
                                            pipeline_class=PLDRQuestionAnsweringPipeline,
                                            pt_model=AutoModelForQuestionAnswering, type="text")


register()

__all__ = ["PLDRHFForSequenceClassification", "PLDRHFForTokenClassification",
           "PLDRHFForQuestionAnswering", "PLDRQuestionAnsweringPipeline", "register"]
