"""`import pldr.hf`: the transformers classes of `pldr.integrations.hf`, registered with
AutoConfig / AutoModelForCausalLM / AutoTokenizer as model type `pldr_llm` (needs the `hf`
extra: `pip install 'pldr-llm[hf]'`)."""

from .integrations.hf import (  # noqa: F401  importing registers the classes
    MODEL_TYPE,
    PLDRCache,
    PLDRCausalLMOutput,
    PLDRForCausalLM,
    PLDRHFConfig,
    PLDRTokenizer,
    register,
)

__all__ = ["PLDRHFConfig", "PLDRForCausalLM", "PLDRCache", "PLDRCausalLMOutput",
           "PLDRTokenizer", "register", "MODEL_TYPE"]
