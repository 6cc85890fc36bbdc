"""`Engine`: continuous batching over the slots of one inference cache.

    req = engine.submit(prompt_ids, max_new_tokens, temperature=..., seed=..., G_LM=...)
    while engine.has_work:
        engine.step()          # admit queued requests into free slots, one token for all
    req.tokens, req.done

Each step runs one decode call for the running requests, prefills newly admitted ones alone
(so each request's A and G_LM come from its own prompt) and samples one token per request
with its own settings and seeded stream; reading those tokens is the step's one host-device
sync. A request's tokens therefore equal `pldr.generate` on its prompt alone, whatever runs
beside it. The docs' Generation page (docs/generation.md, "The engine") describes the
requests, log-probabilities, errors and `compile=True`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..errors import PLDRError, PLDRTypeError
from ..model.cache import GivenG, InferenceCache
from ..model.call import AttentionCall, host_to_device
from ..model.model import PLDRModel
from .checks import (check_eos_id, check_logprobs, check_max_new_tokens, positions_needed,
                     prepare_prompts)
from .sampling import (BAD_ROW, GREEDY, NON_FINITE_MESSAGE, NonFiniteLogitsError,
                       SamplingConfig, check_seed, sample, sample_row)

log = logging.getLogger("pldr")

ENGINE_CACHE_MODES = ("kv_g", "kv_only")  # the modes with a KV part: static decode shapes


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model at its position, and the k most likely ids
    there with theirs, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class Request:
    """One submitted prompt and what it has produced so far."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    eos_id: int
    seed: int | None = None
    G_LM: GivenG | None = None        # given for this request
    logprobs: int | None = None       # most likely ids to report per new token (None: none)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens
    id: int = 0
    tokens: list[int] = field(default_factory=list)  # new ids so far
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per new id
    prompt_token_logprobs: list[TokenLogprobs | None] | None = None  # per prompt id; [0] None
    done: bool = False
    finish_reason: str | None = None  # "eos", "length", "cancelled" or "error"
    error: PLDRError | None = None    # why it ended with "error" (NaN or inf logits)
    slot: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)


class Engine:
    """Requests in the `max_batch` slots of one `InferenceCache` of `max_len` positions
    (default: the model's max_seq_len); see the module docstring."""

    def __init__(self, model: PLDRModel, max_batch: int = 16, max_len: int | None = None, *,
                 cache: str = "kv_g", compile: bool = False):
        if not isinstance(model, PLDRModel):
            raise PLDRTypeError(f"Engine needs a PLDRModel, got {type(model).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise PLDRError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        cfg = model.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_seq_len:
            raise PLDRError(f"max_len must be an integer in [1, {cfg.max_seq_len}] "
                            f"(max_seq_len), got {max_len!r}")
        if cache not in ENGINE_CACHE_MODES:
            raise PLDRError(f"the engine runs cache modes {' and '.join(ENGINE_CACHE_MODES)}, "
                            f"not {cache!r}; use pldr.generate for g_only and no_cache")
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        with torch.no_grad():
            self.cache = InferenceCache.for_mode(cfg, cache, max_batch, max_len,
                                                 model.device, model.dtype, static=compile)
            for s in range(max_batch):
                self.cache.release(s)
        self._last = torch.zeros(max_batch, dtype=torch.long, device=model.device)  # [B]
        self._slots: list[Request | None] = [None] * max_batch
        self._queue: deque[Request] = deque()
        self._ids = itertools.count()
        self._compiled_decode = self._compiled() if compile else None  # over every slot

    # ----- the API --------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int, *,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, eos_id: int | None = None, G_LM=None,
               logprobs: int | None = None, prompt_logprobs: int | None = None) -> Request:
        """Queue a request; every input is checked here, before any work."""
        check_max_new_tokens(max_new_tokens)
        check_logprobs("logprobs", logprobs)
        check_logprobs("prompt_logprobs", prompt_logprobs)
        sampling = SamplingConfig(temperature, top_k, top_p)
        if isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 1:
            prompt_ids = prompt_ids.tolist()
        prompt = prepare_prompts([prompt_ids], self.model)[0]
        check_seed(seed)
        eos_id = check_eos_id(eos_id, self.model)
        need = positions_needed(len(prompt), max_new_tokens)
        if need > self.max_len:
            raise PLDRError(f"the prompt ({len(prompt)} tokens) plus max_new_tokens "
                            f"({max_new_tokens}) needs {need} positions but the engine holds "
                            f"{self.max_len}; shorten one of them or raise max_len")
        G = None if G_LM is None else GivenG.check(G_LM, self.model.config)
        req = Request(prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                      eos_id=eos_id, seed=seed, G_LM=G, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, id=next(self._ids))
        if seed is not None and not sampling.greedy:
            req.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        if max_new_tokens == 0 and prompt_logprobs is None:  # nothing to compute
            self._finish(req, "length")
        else:
            self._queue.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req` now: it leaves the queue or frees its slot; its tokens so far stay."""
        if req.done:
            return
        if req in self._queue:
            self._queue.remove(req)
        self._finish(req, "cancelled")

    @property
    def has_work(self) -> bool:
        """Whether a request is queued or running."""
        return bool(self._queue) or any(r is not None for r in self._slots)

    @property
    def running(self) -> list[Request]:
        return [r for r in self._slots if r is not None]

    @property
    def queued(self) -> list[Request]:
        return list(self._queue)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Advance every running request by one token and admit queued requests into free
        slots (each prefilled alone, producing its first token). Returns the requests that
        received a token or ended with an error, in slot order (ended ones first), and
        those that only had their prompt scored (max_new_tokens=0)."""
        running = self.running
        logits = self._decode_running(running) if running else None  # [N, V]: running[i]
        reads = _HostRead()  # everything this step hands back: read in one copy
        admitted, scored, scoring = [], [], []
        for slot in range(self.max_batch):
            while self._slots[slot] is None and self._queue:
                req = self._queue.popleft()
                row, prompt_lp = self._prefill(req, slot, reads)                      # [V]
                if prompt_lp is not None:
                    scoring.append((req, prompt_lp))
                if req.max_new_tokens == 0:  # the prompt's log-probabilities were the task
                    scored.append(req)
                    self._leave_after_scoring(req, slot, row)  # the slot serves the next
                else:
                    admitted.append((req, row))
        got = ([(r, logits[i]) for i, r in enumerate(running)] + admitted)
        picked = asked_lp = None
        asked = [i for i, (r, _) in enumerate(got) if r.logprobs is not None]
        if got:
            picks = _pick_tokens(running, logits, admitted)                           # [N]
            self._last[host_to_device([r.slot for r, _ in got], picks.device)] = picks
            picked = reads.add(picks)
            if asked:
                rows = torch.stack([got[i][1] for i in asked])                        # [M, V]
                asked_lp = _logprob_tensors(rows, picks[asked],
                                            [got[i][0].logprobs for i in asked], reads)
        values = reads.read()  # the one host-device sync of a step, logprobs or not
        for req, handles in scoring:
            req.prompt_token_logprobs += _logprob_records(values, handles)
        for req in scored:
            if not _finite(req.prompt_token_logprobs):
                self._fail(req)
        if not got:
            return scored
        tokens = [int(t) for t in values[picked]]
        records = dict(zip(asked, _logprob_records(values, asked_lp))) if asked else {}
        for i, ((req, _), tok) in enumerate(zip(got, tokens)):
            if tok == BAD_ROW:
                self._fail(req)
                continue
            req.tokens.append(tok)
            if i in records:
                req.token_logprobs.append(records[i])
            if tok == req.eos_id:
                self._finish(req, "eos")
            elif len(req.tokens) >= req.max_new_tokens:
                self._finish(req, "length")
        return scored + sorted((r for r, _ in got),
                               key=lambda r: r.slot if r.slot is not None else -1)

    def run(self) -> None:
        """Step until no request is queued or running."""
        while self.has_work:
            self.step()

    # ----- slots ----------------------------------------------------------------------------

    def _decode_running(self, running: list[Request]) -> Tensor:
        """The next-token logits [N, V] of the running requests (row i: running[i]).

        Compiled, every slot runs (the static shapes that torch.compile and CUDA graphs
        need) and the running rows are taken out. Eager, every slot runs too while more
        than half of them are busy: the call then reads the cache's buffers in place, where
        a call on listed slots copies each layer's keys, values and G_LM of its rows (slower
        then; figures in docs/benchmarks.md, "Batched steps"). With fewer busy,
        only their slots run, so a lone request in a 16-slot engine pays for one row."""
        slots = [r.slot for r in running]
        rows = host_to_device(slots, self._last.device)
        if self._compiled_decode is not None:  # every slot (static shapes), then the running
            ids = self._last[:, None]                                             # [B, 1]
            call = self.model.describe(ids, cache=self.cache)  # host state stays outside
            logits = self._compiled_decode(self.model, ids, call)
            self.cache.advance(None, 1)
            return logits.index_select(0, rows)
        if 2 * len(slots) > self.max_batch:    # every slot, then the running (all: in order)
            logits = decode_cached(self.model, self.cache, self._last)            # [B, V]
            return logits if len(slots) == self.max_batch else logits.index_select(0, rows)
        out = self.model(self._last[rows][:, None], cache=self.cache, slots=slots,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def _prefill(self, req: Request, slot: int,
                 reads: "_HostRead") -> tuple[Tensor, "_LogprobHandles | None"]:
        """Put `req` in `slot` and run its prompt alone; returns its last logits [V] and,
        with `prompt_logprobs`, where `reads` will hold its prompt's log-probabilities (the
        output head also runs over the other positions, apart, so the last logits are those
        of a request without them); `req.prompt_token_logprobs` starts as [None] (the first
        id has nothing before it) and the step appends the rest once it has read them."""
        self.cache.reset(slot)
        if req.G_LM is not None:
            self.cache.set_G_LM(req.G_LM, slot=slot)
        req.slot, self._slots[slot] = slot, req
        ids = torch.tensor([req.prompt], dtype=torch.long, device=self.model.device)
        out = self.model(ids, cache=self.cache, slots=[slot], logits_to_keep=1)
        handles = None
        if req.prompt_logprobs is not None:  # the first id has nothing before it: None
            req.prompt_token_logprobs = [None]
            if ids.shape[1] > 1:
                head = self.model.final_layer(out.hidden[0, :-1])                  # [T-1, V]
                handles = _logprob_tensors(head, ids[0, 1:],
                                           [req.prompt_logprobs] * (ids.shape[1] - 1), reads)
        return out.logits[0, -1], handles

    def _leave_after_scoring(self, req: Request, slot: int, row: Tensor) -> None:
        """A request that only scores its prompt ends as soon as it is prefilled, so the next
        queued request can take its slot in the same step; its log-probabilities are read
        with the step's one copy (and turn it into an error if they are not finite). Since
        nothing of it is read yet, the positions it wrote are zeroed on the device when its
        last logits [V] are not finite (NaN keys or values would poison the slot's next
        request, as `_fail` explains): a few prompt rows, no sync."""
        finite = torch.isfinite(row).all()                                            # 0-d
        self.cache.tensors.zero(slot, upto=len(req.prompt), unless=finite)
        self._finish(req, "length")

    def _fail(self, req: Request) -> None:
        """End `req`, whose logits are not finite, with its error; its slot's cached keys and
        values are zeroed, so no NaN of it reaches the next request in that slot, and its
        last id becomes a valid one (a step over every slot still decodes it while idle)."""
        req.error = NonFiniteLogitsError(NON_FINITE_MESSAGE)
        log.warning("request %d: %s", req.id, req.error)
        if req.slot is not None:
            self.cache.clear(req.slot)
            self._last[req.slot] = 0  # not BAD_ROW: a step over every slot decodes idle ones
        self._finish(req, "error")

    def _finish(self, req: Request, reason: str) -> None:
        req.done, req.finish_reason = True, reason
        if req.slot is not None:
            self.cache.release(req.slot)
            self._slots[req.slot] = None
            req.slot = None

    def _compiled(self):
        """The decode call under torch.compile; on CUDA with CUDA graphs, whose replays need
        the cache's buffers at fixed addresses."""
        cuda = self.model.device.type == "cuda"
        if cuda:
            for t in self.cache.tensors.buffers():
                torch._dynamo.mark_static_address(t)
        log.info("compiling the decode step (mode=%s)", "reduce-overhead" if cuda else "default")
        return torch.compile(run_decode, mode="reduce-overhead" if cuda else None, dynamic=False)


def _pick_tokens(running: list[Request], logits: Tensor | None,
                 admitted: list[tuple[Request, Tensor]]) -> Tensor:
    """The next token of every running request (row i of the decode logits [N, V] is
    running[i]) and of every admitted one (its prefill logits [V]), in that order -> [N + A],
    with no sync.

    The greedy running requests share one argmax over the decode logits (with 16 requests
    that is one launch per op instead of 16); every other request is picked alone with its
    own settings and seeded stream, exactly as `sample_row` picks it in `pldr.generate`."""
    shared = (sample(logits, GREEDY)                                                   # [N]
              if logits is not None and any(r.sampling.greedy for r in running) else None)
    picks = [shared[i] if r.sampling.greedy else
             sample_row(logits[i], r.sampling, r.generator) for i, r in enumerate(running)]
    picks += [sample_row(row, r.sampling, r.generator) for r, row in admitted]
    return torch.stack(picks)


class _HostRead:
    """Tensors to hand back to the host together: `add` queues one (on the device, no
    sync) and returns its index, `read` copies them all in one go (one sync) as lists of
    floats. Token ids travel as float64, exact below 2**53."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []

    def add(self, t: Tensor) -> int:
        self.parts.append(t.reshape(-1).to(torch.float64))
        return len(self.parts) - 1

    def read(self) -> list[list[float]]:
        if not self.parts:
            return []
        flat = torch.cat(self.parts).tolist()
        out, at = [], 0
        for part in self.parts:
            out.append(flat[at:at + part.numel()])
            at += part.numel()
        return out


@dataclass(frozen=True)
class _LogprobHandles:
    """Where a `_HostRead` holds rows' log-probabilities: the chosen ids' [N], the top k
    values and ids [N, k], and each row's own k."""

    chosen: int
    values: int
    top: int
    k: int
    ks: tuple[int, ...]


def _logprob_tensors(logits: Tensor, ids: Tensor, ks: list[int],
                     reads: _HostRead) -> _LogprobHandles:
    """Row i of logits [N, V]: the log-probability of ids[i] [N] and the ks[i] most likely
    ids, queued on `reads` (no sync). A BAD_ROW id (non-finite logits, a request that
    fails) gets a record nobody reads."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    chosen = logp.gather(1, ids.clamp(min=0)[:, None])[:, 0]                         # [N]
    k = min(max(ks), logp.shape[-1])
    values, top = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())   # [N, k]
    return _LogprobHandles(reads.add(chosen), reads.add(values), reads.add(top), k, tuple(ks))


def _logprob_records(read: list[list[float]], h: _LogprobHandles) -> list[TokenLogprobs]:
    """The records of `_logprob_tensors` once `read` holds the values."""
    chosen, values, top = read[h.chosen], read[h.values], read[h.top]
    return [TokenLogprobs(c, tuple((int(t), v) for t, v in
                                   zip(top[i * h.k:i * h.k + n], values[i * h.k:i * h.k + n])))
            for i, (c, n) in enumerate(zip(chosen, h.ks))]


def _finite(records: list[TokenLogprobs | None]) -> bool:
    """Whether a scored prompt's log-probabilities are numbers (not NaN, as from a model
    whose weights or G_LM are not finite)."""
    return all(r is None or math.isfinite(r.logprob) for r in records)


def decode_cached(model: PLDRModel, cache: InferenceCache, next_ids: Tensor) -> Tensor:
    """One token per slot through a KV cache: next_ids [B] -> the next logits [B, V]."""
    return model(next_ids[:, None], cache=cache, logits_to_keep=1).logits[:, -1]


def run_decode(model: PLDRModel, ids: Tensor, call: AttentionCall) -> Tensor:
    """The layers of a described decode call, ids [B, 1] -> the next logits [B, V]: static
    shapes, no host state, no host-device sync (what the engine compiles)."""
    return model.run(ids, call, logits_to_keep=1).logits[:, -1]
