"""The typed messages between the server and the engine process (frozen dataclasses, sent
pickled through two pipes). Every message is one of these classes; nothing positional
crosses the process boundary. The two sent every step (`Step` and its `Update`s) pickle as
their fields (`__reduce__`), which costs a third of the slots' default state pickling.

    server -> engine process:  Submit | Cancel | Stop
    engine process -> server:  Ready | LoadFailed   (once, after loading the model)
                               Step                 (one per engine step with news)
                               Crashed              (the process is about to end)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import PLDRError

# ----- server -> engine process ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """`Engine.submit`'s per-request keywords (everything but the prompt and the length)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None         # most likely ids to report per new id
    prompt_logprobs: int | None = None  # the same for the prompt's ids (echo with logprobs)

    def keywords(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Submit:
    """Queue one choice in the engine under the runner's id `id`."""

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling


@dataclass(frozen=True, slots=True)
class Cancel:
    """Free the slot of choice `id` (the client left, or a stop string ended its text)."""

    id: int


@dataclass(frozen=True, slots=True)
class Stop:
    """End the engine process after its current step."""


# ----- engine process -> server ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded: its config (`PLDRConfig.to_dict`), the positions per slot and
    the dtype it runs in (float32, bfloat16, int8)."""

    config: dict
    max_len: int
    dtype: str


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The model could not be loaded; `message` is the one line to show, `param` the
    Python parameter at fault, if the library named one."""

    message: str
    param: str | None = None

    def error(self) -> PLDRError:
        return PLDRError(self.message, param=self.param)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a choice ended without finishing: `kind` is "refused" (the engine's checks
    refused the request: the client's fault), "model" (NaN or inf logits) or "engine" (the
    engine process ended); `param` is the Python parameter a refusal names."""

    kind: str
    message: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """What one step brought one choice: its new ids (and their logprobs, if asked), its
    prompt's logprobs (with its first update only), and whether it has ended."""

    id: int
    ids: tuple[int, ...] = ()
    logprobs: tuple | None = None         # TokenLogprobs per new id
    prompt_logprobs: tuple | None = None  # TokenLogprobs per prompt id ([0] None)
    done: bool = False
    failure: Failure | None = None

    def __reduce__(self):  # pickled as its fields: a third of slots' default cost, per step
        return Update, (self.id, self.ids, self.logprobs, self.prompt_logprobs, self.done,
                        self.failure)


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step's news, for every choice that got ids or ended. Most choices of a
    step only get ids: they come as `ids`, (choice id, new ids) pairs, which cost what a
    tuple costs to build and pickle (an `Update` per choice per step cost ten times more);
    the others (ended, failed, or with logprobs) come as `updates`."""

    ids: tuple[tuple[int, tuple[int, ...]], ...] = ()
    updates: tuple[Update, ...] = ()

    def __reduce__(self):
        return Step, (self.ids, self.updates)


@dataclass(frozen=True, slots=True)
class Crashed:
    """The engine process failed (a bug); the server fails every running choice."""

    reason: str
    traceback: str
