"""One completion choice on the server, as its ids arrive: its lifecycle (waiting, running,
finished or failed), its text (incrementally decoded, cut at stop strings, held back while it
might still be a stop string or half a character), what has been shown of it and, when
asked, each id's log-probabilities in OpenAI's `logprobs` shape."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

from ..data.detokenize import TextDecoder


class Scored(NamedTuple):
    """One id of a choice with logprobs: its text, where that starts in the response's text
    (echo included), and its TokenLogprobs (None for a prompt's first id)."""

    id: int
    text: str
    start: int
    record: Any


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each id adds, so that "".join(token_texts(ids)) == decode(ids): an id that
    ends inside a multi-byte character adds "" and the id that completes it the character."""
    decoder, out, text = TextDecoder(tokenizer), [], ""
    for i in ids:
        n = len(decoder.committed)
        text = decoder.add([i])
        out.append(decoder.committed[n:])
    if out:
        out[-1] += text[len(decoder.committed):]
    return out


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Choice:
    """One completion choice on the server: the one owner of its lifecycle and of what has
    been shown of it.

    Lifecycle: `phase` is "waiting" (no id yet: queued in the engine, or not submitted),
    "running" (ids arriving) or "finished" (its last ids came, a stop string or EOS ended
    its text, it was cancelled, or it failed: `failure` says why). `done` is phase ==
    "finished"; nothing else tracks it. The runner routes the engine's `Update`s to
    `accept`, on the event loop only, and calls `wake` after each.

    Text: stop strings cut it, and streaming holds back what might still turn out to be a
    stop string or half a multi-byte character (`new_text`, `sent`: the characters shown so
    far). With `logprobs` it keeps each id's log-probabilities and where its text ends;
    `offset` is the length of the text before it in the response (an echoed prompt)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos_id: int,
                 logprobs: bool = False, prompt: list[int] | tuple = (), offset: int = 0,
                 wake: Callable[[], None] | None = None):
        self.stops, self.eos_id, self.offset = stops, eos_id, offset
        self.wake = wake or (lambda: None)
        self.decoder = TextDecoder(tokenizer, prompt)
        self.text = ""
        self.sent = 0         # characters of `text` shown to the client
        self.stopped = False  # a stop string or EOS ended it
        self.cut = False      # a stop string ended it (the text stops before the last ids')
        self.phase = WAITING
        self.failure: Any = None  # a messages.Failure once it failed
        self.id = -1              # the runner's id, once submitted
        self.logprobs: list | None = [] if logprobs else None  # TokenLogprobs per id
        self.prompt_logprobs: list | None = None  # per prompt id ([0] None), if asked
        self.ends: list[int] = []  # with logprobs: per id, the text's length once it came
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._full = ""            # the text before a stop string cut it
        self._logprobs_sent = 0

    @property
    def done(self) -> bool:
        return self.phase == FINISHED

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids[self.decoder.start:]

    # ----- the lifecycle (the runner calls these on the event loop) -----------------------

    def accept(self, update: Any) -> None:
        """Take one engine step's `messages.Update` for this choice (ignored once done: a
        stop string ended it and the engine's last ids are not wanted)."""
        if self.done:
            return
        if update.prompt_logprobs is not None:  # with the first update, before its ids
            self.prompt_logprobs = list(update.prompt_logprobs)
        if update.ids:
            now = time.perf_counter()
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.phase = RUNNING
        if update.failure is not None:
            self.fail(update.failure)
            return
        self.add(list(update.ids), update.done,
                 None if update.logprobs is None else list(update.logprobs))
        self.wake()

    def accept_ids(self, ids: tuple[int, ...]) -> None:
        """Take new ids (no logprobs, not the last): the common update of a step."""
        if self.done:
            return
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.phase = RUNNING
        self.add(list(ids), False)
        self.wake()

    def fail(self, failure: Any) -> None:
        """End it with `failure`; its text so far is dropped (a stream ends it with an
        "error" chunk, a plain response fails as a whole)."""
        if not self.done:
            self.failure, self.text, self.stopped = failure, "", True
            self.phase = FINISHED
            self.wake()

    def finish(self) -> None:
        """End it as it stands (cancelled, or nothing to generate)."""
        if not self.done:
            self.phase = FINISHED
            self.wake()

    # ----- the text ------------------------------------------------------------------------

    def add(self, ids: list[int], last: bool, logprobs: list | None = None) -> None:
        """Append `ids` (`last`: no more will come); a stop string ends it."""
        if self.logprobs is None:
            text = self.decoder.add(ids)
        else:  # one id at a time, to know where the text of each ends
            text = self.decoder.add([]) if not ids else ""
            for i in ids:
                text = self.decoder.add([i])
                self.ends.append(len(self.decoder.committed))
            self.logprobs += logprobs or []
        self._full = text
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped, self.cut, last = text[:min(cuts)], True, True, True
        if self.ids and self.ids[-1] == self.eos_id:
            self.stopped = True
        self.text = text
        if last:
            self.phase = FINISHED

    def new_text(self) -> str:
        """What may be shown now and was not shown yet (with logprobs: whole ids' texts, so
        a chunk's logprobs are those of its text)."""
        end = len(self.text)
        if not self.done:
            end -= max((len(s) - 1 for s in self.stops), default=0)
            # half a character decodes to one U+FFFD per byte so far: hold them all back
            end = min(end, len(self.text.rstrip("\ufffd")))
            if self.logprobs is not None:
                end = max((e for e in self.ends if e <= end), default=0)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def scored(self) -> list[Scored]:
        """Each id whose text is in `text` (an id cut off by a stop string is left out), so
        the texts join to `text`."""
        ends = list(self.ends)
        if self.done and ends:
            ends[-1] = len(self._full)  # a last incomplete character belongs to the last id
        out, start = [], 0
        for i, end, record in zip(self.ids, ends, self.logprobs or []):
            if self.cut and start >= len(self.text):
                break
            out.append(Scored(i, self._full[start:min(end, len(self.text))],
                              self.offset + start, record))
            start = end
        return out

    def new_scored(self) -> list[Scored]:
        """The `scored` ids whose text has been shown (all once done) and were not sent; one
        with no text yet (half a character, a special id) waits for text after it, since a
        stop string that starts there would cut it off."""
        entries = self.scored()
        if not self.done:
            shown = self.offset + self.sent
            entries = [e for e in entries if e.start + max(len(e.text), 1) <= shown]
        out = entries[self._logprobs_sent:]
        self._logprobs_sent += len(out)
        return out

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else "length"


def prompt_scored(tokenizer: Any, prompt: list[int], records: list | None) -> list[Scored]:
    """The `Scored` ids of an echoed prompt (its first id has no record; none has without
    `records`)."""
    out, start = [], 0
    records = records or [None] * len(prompt)
    for i, text, record in zip(prompt, token_texts(tokenizer, prompt), records):
        out.append(Scored(i, text, start, record))
        start += len(text)
    return out


def logprobs_json(tokenizer: Any, entries: list[Scored]) -> dict[str, list]:
    """OpenAI's completion `logprobs` object of `entries`: tokens, token_logprobs,
    top_logprobs (the most likely tokens, by piece with SentencePiece's U+2581 shown as a
    space, and the chosen one by its text, so top_logprobs[j][tokens[j]] is always there)
    and text_offset."""
    def piece(i: int) -> str:  # the model may know ids its tokenizer does not
        return tokenizer.id_to_piece(i).replace("\u2581", " ") if i < len(tokenizer) else ""

    tops = []
    for e in entries:
        if e.record is None:
            tops.append(None)
            continue
        top = {e.text if t == e.id else piece(t): lp for t, lp in e.record.top}
        top.setdefault(e.text, e.record.logprob)
        tops.append(top)
    return {"tokens": [e.text for e in entries],
            "token_logprobs": [None if e.record is None else e.record.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.start for e in entries]}
