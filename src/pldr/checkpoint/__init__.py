"""Reading and writing models and G_LM files, safely.

- `load_model`: an original checkpoint (`.pth`/`.pt`, as the original release saves it) with
  its hpdict, or a directory written by `save_pretrained` (`config.json` +
  `model.safetensors`). The model is built on the meta device and takes the loaded tensors
  as they are (no second copy, no random init).
- `save_pretrained`: our directory format, written under a temporary name and renamed.
- `load_G_LM` / `load_G_LM_pairs` / `save_G_LM`: the paper's predefined G_LM pickles, `.pt`
  files and our `.safetensors` layout.

Nothing here executes code from a file: checkpoints load with `torch.load(weights_only=True)`,
and G_LM pickles go through `_TensorOnlyUnpickler`, which admits only the three functions
that rebuild tensors (docs/checkpoints.md, "Safe loading").

G_LM `.safetensors` layout (written by `save_G_LM`, read by `load_G_LM`): a tensor `G_LM`
[L, H, dk, dk] (one [H, dk, dk] slice per decoder layer), optionally `A_LM` of the same shape,
and the header metadata {"format": "pt", "content": "pldr.G_LM"}. A leading singleton axis,
[L, 1, H, dk, dk], is accepted on reading.
"""

from ..model.pretrained import (
                         CONFIG_FILE,
                         TOKENIZER_FILE,
                         WEIGHTS_FILE,
                         read_safetensors,
                         save_pretrained,
                         write_model_files,
)
from .glm import load_G_LM, load_G_LM_pairs, save_G_LM
from .load import (
    G_LM_key,
    check_state_fits,
    inspect_checkpoint,
    load_for_inference,
    load_model,
    read_state,
)

__all__ = ["load_model", "load_for_inference", "read_state", "inspect_checkpoint", "check_state_fits", "G_LM_key",
           "save_pretrained", "write_model_files", "read_safetensors", "CONFIG_FILE",
           "WEIGHTS_FILE", "TOKENIZER_FILE", "load_G_LM", "load_G_LM_pairs", "save_G_LM"]
