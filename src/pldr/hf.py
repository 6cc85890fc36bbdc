"""`import pldr.hf`: the transformers classes of `pldr.integrations.hf`, registered with
AutoConfig / AutoModelForCausalLM / AutoTokenizer as model type `pldr_llm`, and the task heads
of `pldr.integrations.hf_heads` with AutoModelForSequenceClassification /
AutoModelForTokenClassification / AutoModelForQuestionAnswering and the question-answering
pipeline (needs the `hf` extra; `pldr.errors.install_extra_command("hf")` is the command that
installs it)."""

from .integrations.hf import (  # noqa: F401  importing registers the classes
    MODEL_TYPE,
    PLDRCache,
    PLDRCausalLMOutput,
    PLDRForCausalLM,
    PLDRHFConfig,
    PLDRTokenizer,
    register,
)
from .integrations.hf_heads import (  # noqa: F401  importing registers the heads
    PLDRHFForQuestionAnswering,
    PLDRHFForSequenceClassification,
    PLDRHFForTokenClassification,
    PLDRQuestionAnsweringPipeline,
)

__all__ = ["PLDRHFConfig", "PLDRForCausalLM", "PLDRCache", "PLDRCausalLMOutput",
           "PLDRTokenizer", "register", "MODEL_TYPE", "PLDRHFForSequenceClassification",
           "PLDRHFForTokenClassification", "PLDRHFForQuestionAnswering",
           "PLDRQuestionAnsweringPipeline"]
