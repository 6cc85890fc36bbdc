"""Task heads over the PLDR decoder, laid out as the transformers port's head classes, so
the port's head checkpoints load as they are (reference/hfport/README.md):

    PLDRForSequenceClassification  decoder.* + score [num_labels, D] (no bias); pools the
                                   last real token of each row        -> logits [B, num_labels]
    PLDRForTokenClassification     decoder.* + dropout + score [num_labels, D] (+ bias)
                                                                      -> logits [B, T, num_labels]
    PLDRForQuestionAnswering       decoder.* + qa_outputs [2, D] (+ bias)
                                                  -> start_logits, end_logits [B, T]

`decoder` is the causal model's decoder (same modules, same parameter names); the forward is
`PLDRModel`'s, run by a body that shares the decoder and has no output layer, so padding,
`metric_includes_pad`, RoPE style and v510G behave exactly as for the causal model. The labels
(`num_labels`, `id2label`, `label2id`, `problem_type`) live in the `PLDRConfig`.

Losses are transformers' (and so the port's): sequence classification by problem_type
(regression: MSE; single label: cross-entropy; multi label: BCE with logits; None: chosen from
num_labels and the labels' dtype), token classification cross-entropy with -100 ignored,
question answering the mean of the start and end cross-entropies with positions clamped to
[0, T] and T ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PLDRConfig
from ..errors import PLDRError, PLDRTypeError
from .model import Deductive, PLDRModel, PLDROutput

IGNORE_INDEX = -100  # a label that counts for nothing (token classification, as transformers)


# ----- outputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SequenceClassifierOutput:
    """logits [B, num_labels] at each row's pooled position `pool_index` [B]; `loss` when
    labels were given; `hidden` [B, T, D] the decoder's output."""

    logits: Tensor
    loss: Tensor | None
    hidden: Tensor
    pool_index: Tensor
    deductive: Deductive | None = None


@dataclass(frozen=True)
class TokenClassifierOutput:
    """logits [B, T, num_labels]; `loss` when labels [B, T] were given."""

    logits: Tensor
    loss: Tensor | None
    hidden: Tensor
    deductive: Deductive | None = None


@dataclass(frozen=True)
class QuestionAnsweringOutput:
    """start_logits and end_logits [B, T] of the answer span; `loss` when both positions
    were given."""

    start_logits: Tensor
    end_logits: Tensor
    loss: Tensor | None
    hidden: Tensor
    deductive: Deductive | None = None


# ----- the shared part ------------------------------------------------------------------------------

class _TaskHead(nn.Module):
    """A decoder and a head. Subclasses set the names and build/apply the head."""

    task: ClassVar[str]               # the `pldr finetune --task` name
    architecture: ClassVar[str]       # written to our config.json's "architectures"
    port_architecture: ClassVar[str]  # the port's class of the same head

    def __init__(self, config: PLDRConfig, G_LM: Tensor | Sequence[Tensor] | None = None):
        super().__init__()
        if not isinstance(config, PLDRConfig):
            raise PLDRTypeError(f"{type(self).__name__} needs a PLDRConfig, got "
                                f"{type(config).__name__}")
        self.config = config
        # the body is built without parameters, loses its output layer, and only then gets
        # memory and its initial weights (no vocabulary-sized layer is ever allocated)
        device = torch.empty(0).device  # the caller's default device (meta when loading)
        with torch.device("meta"):
            body = PLDRModel(config, G_LM=G_LM)
        body.final_layer = nn.Identity()  # its "logits" are the last hidden states [B, T, D]
        self.decoder = body.decoder
        object.__setattr__(self, "_body", body)  # shares `decoder`; not a second copy
        with torch.device("meta"):
            self._build_head(config)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def _build_head(self, config: PLDRConfig) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self) -> None:
        """The decoder as `PLDRModel.init_weights` (from scratch; loading overwrites it) and
        the head normal(0, 0.02) with zero biases, as transformers initialises a new head.
        Call after `to_empty()` when built on the meta device."""
        if self.decoder.embedding.weight.is_meta:
            return
        self._body.init_weights()
        for module in self._head_modules():
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _head_modules(self) -> list[nn.Linear]:
        return [m for name, m in self.named_children() if isinstance(m, nn.Linear)]

    def _decode(self, ids: Tensor, attention_mask: Tensor | None,
                return_deductive: bool) -> PLDROutput:
        """The causal model's forward without its output layer: `.hidden` [B, T, D]."""
        if attention_mask is not None and isinstance(attention_mask, Tensor):
            attention_mask = attention_mask.to(ids.device)
        return self._body(ids, attention_mask=attention_mask, return_deductive=return_deductive)

    # ----- what PLDRModel offers too --------------------------------------------------------

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward (see PLDRModel.set_activation_checkpointing)."""
        self._body.set_activation_checkpointing(enabled)

    def rope_tables(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        return self._body.rope_tables(device)

    @property
    def device(self) -> torch.device:
        return self.decoder.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embedding.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write `config.json` (with "architectures": [this class]) + `model.safetensors`
        (+ `tokenizer.model`) to `directory`, as PLDRModel.save_pretrained."""
        from .pretrained import save_pretrained

        save_pretrained(self, directory, tokenizer=tokenizer)


def last_real_index(real: Tensor) -> Tensor:
    """[B] index of each row's rightmost real token of real [B, T] (0 for a row with none):
    left and right padding alike, the port's expression (positions times the indicator,
    argmax over the sequence)."""
    positions = torch.arange(real.shape[1], device=real.device)
    return (positions * real.to(torch.long)).argmax(dim=1)


def _check_labels(labels: Tensor, num_labels: int, what: str) -> None:
    """Class labels must lie in [0, num_labels) or be -100 (ignored): one line, not a
    device-side assert deep inside cross_entropy."""
    if labels.is_floating_point():
        raise PLDRTypeError(f"{what} must be integer class ids, got {labels.dtype}")
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= num_labels)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise PLDRError(f"{what} holds label {value}, outside [0, num_labels={num_labels}) "
                        f"(-100 is ignored); fix the labels or num_labels")


def _wide(logits: Tensor) -> Tensor:
    """Logits for a loss: float32 at least (bf16/fp16 round the loss), float64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _check_shape(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, Tensor):
        raise PLDRTypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise PLDRError(f"{what} must have shape {list(shape)}, got {list(t.shape)}")


# ----- the three heads --------------------------------------------------------------------------------

class PLDRForSequenceClassification(_TaskHead):
    """One label (or score) per sequence from the last real token's hidden state."""

    task = "sequence-classification"
    architecture = "PLDRForSequenceClassification"
    port_architecture = "PldrllmForSequenceClassification"

    def _build_head(self, config: PLDRConfig) -> None:
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *,
                labels: Tensor | None = None,
                return_deductive: bool = False) -> SequenceClassifierOutput:
        """ids [B, T] -> logits [B, num_labels] at each row's last real token: from
        `attention_mask` [B, T] when given (1 = real), else from the pad id as the port.
        `labels`: [B] class ids (single label), [B, num_labels] 0/1 (multi label) or [B] /
        [B, num_labels] floats (regression)."""
        out = self._decode(ids, attention_mask, return_deductive)
        real = attention_mask if attention_mask is not None else ids != self.config.pad_id
        pool = last_real_index(real.to(out.hidden.device))                   # [B]
        rows = torch.arange(ids.shape[0], device=pool.device)
        logits = self.score(out.hidden[rows, pool])                          # [B, num_labels]
        loss = None if labels is None else sequence_loss(logits, labels, self.config)
        return SequenceClassifierOutput(logits=logits, loss=loss, hidden=out.hidden,
                                        pool_index=pool, deductive=out.deductive)


def problem_type_of(config: PLDRConfig, labels: Tensor) -> str:
    """config.problem_type, or transformers' choice when it is None: one label ->
    regression; integer labels -> single label; else multi label."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if not labels.is_floating_point() and labels.dtype != torch.bool:
        return "single_label_classification"
    return "multi_label_classification"


def sequence_loss(logits: Tensor, labels: Tensor, config: PLDRConfig) -> Tensor:
    """The loss of pooled logits [B, n] by problem type (computed in float32)."""
    B, n = logits.shape
    labels = labels.to(logits.device)
    problem = problem_type_of(config, labels)
    logits = _wide(logits)
    if problem == "regression":
        if n == 1:
            if labels.numel() != B:
                raise PLDRError(f"regression labels must have shape [{B}], got {list(labels.shape)}")
            return F.mse_loss(logits.view(B), labels.reshape(B).to(logits.dtype))
        _check_shape(labels, (B, n), "regression labels")
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        _check_shape(labels, (B,), "labels")
        _check_labels(labels, n, "labels")
        return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
    _check_shape(labels, (B, n), "multi-label labels")
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class PLDRForTokenClassification(_TaskHead):
    """One label per token: dropout, then a biased linear layer (the port's head)."""

    task = "token-classification"
    architecture = "PLDRForTokenClassification"
    port_architecture = "PldrllmForTokenClassification"

    def _build_head(self, config: PLDRConfig) -> None:
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=True)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *,
                labels: Tensor | None = None,
                return_deductive: bool = False) -> TokenClassifierOutput:
        """ids [B, T] -> logits [B, T, num_labels]; `labels` [B, T] class ids, -100 where a
        position does not count (pads, a word's later pieces)."""
        out = self._decode(ids, attention_mask, return_deductive)
        logits = self.score(self.dropout(out.hidden))                        # [B, T, n]
        loss = None
        if labels is not None:
            _check_shape(labels, tuple(ids.shape), "labels")
            labels = labels.to(logits.device)
            _check_labels(labels, self.config.num_labels, "labels")
            loss = F.cross_entropy(_wide(logits).flatten(0, 1), labels.long().flatten(),
                                   ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(logits=logits, loss=loss, hidden=out.hidden,
                                     deductive=out.deductive)


class PLDRForQuestionAnswering(_TaskHead):
    """Extractive question answering: a start and an end logit per token."""

    task = "question-answering"
    architecture = "PLDRForQuestionAnswering"
    port_architecture = "PldrllmForQuestionAnswering"

    def _build_head(self, config: PLDRConfig) -> None:
        self.qa_outputs = nn.Linear(config.d_model, 2, bias=True)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                return_deductive: bool = False) -> QuestionAnsweringOutput:
        """ids [B, T] (the question, the context, EOS: `question_answering_input`) ->
        start_logits, end_logits [B, T]; with start/end_positions [B] (token indices of the
        answer's first and last token) the loss."""
        out = self._decode(ids, attention_mask, return_deductive)
        start, end = self.qa_outputs(out.hidden).unbind(dim=-1)              # [B, T] each
        start, end = start.contiguous(), end.contiguous()
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise PLDRError("give both start_positions and end_positions, or neither")
        if start_positions is not None:
            loss = span_loss(start, end, start_positions, end_positions)
        return QuestionAnsweringOutput(start_logits=start, end_logits=end, loss=loss,
                                       hidden=out.hidden, deductive=out.deductive)


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor,
              end_positions: Tensor) -> Tensor:
    """Mean of the start and end cross-entropies; positions outside [0, T) are clamped to T
    and ignored (an answer cut off by the window counts for nothing), as transformers."""
    B, T = start_logits.shape
    losses = []
    for logits, positions, what in ((start_logits, start_positions, "start_positions"),
                                    (end_logits, end_positions, "end_positions")):
        positions = positions.to(logits.device)
        if positions.dim() > 1:
            positions = positions.squeeze(-1)
        _check_shape(positions, (B,), what)
        if positions.is_floating_point():
            raise PLDRTypeError(f"{what} must be integer token indices, got {positions.dtype}")
        losses.append(F.cross_entropy(_wide(logits), positions.long().clamp(0, T),
                                      ignore_index=T))
    return (losses[0] + losses[1]) / 2


def question_answering_input(question: Sequence[int], context: Sequence[int],
                             eos_id: int) -> tuple[list[int], int]:
    """The input layout of the question-answering head (as `pldr finetune` encodes SQuAD):
    the question's ids, the context's ids, EOS. Returns the ids and the index of the
    context's first token (answer positions are counted in these ids)."""
    return [*question, *context, eos_id], len(question)


# ----- which head a checkpoint holds -------------------------------------------------------------

HEADS: dict[str, type[_TaskHead]] = {cls.task: cls for cls in (
    PLDRForSequenceClassification, PLDRForTokenClassification, PLDRForQuestionAnswering)}
_SUFFIXES = {"ForSequenceClassification": PLDRForSequenceClassification,
             "ForTokenClassification": PLDRForTokenClassification,
             "ForQuestionAnswering": PLDRForQuestionAnswering}


def head_class(architectures: Sequence[str] | None) -> type[_TaskHead] | None:
    """The head class that a config.json's `architectures` names (ours PLDRFor..., the
    port's PldrllmFor..., pldr.hf's PLDRHFFor...), or None for a causal LM."""
    for name in architectures or ():
        for suffix, cls in _SUFFIXES.items():
            if isinstance(name, str) and name.endswith(suffix):
                return cls
    return None


def is_head_model(model: object) -> bool:
    return isinstance(model, _TaskHead)


__all__ = ["PLDRForSequenceClassification", "PLDRForTokenClassification",
           "PLDRForQuestionAnswering", "SequenceClassifierOutput", "TokenClassifierOutput",
           "QuestionAnsweringOutput", "HEADS", "head_class", "is_head_model", "last_real_index",
           "sequence_loss", "span_loss", "problem_type_of", "question_answering_input",
           "IGNORE_INDEX"]
