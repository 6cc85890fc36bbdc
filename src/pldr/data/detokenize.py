"""Text of ids as they arrive: what `pldr generate` prints while it streams and what the
server sends, decoded incrementally and, given the prompt, as the prompt's continuation."""

from __future__ import annotations

from typing import Any


class TextDecoder:
    """decode(ids) as ids arrive, decoding only the ids since the last whole character (with
    the id before them as context, for SentencePiece's spaces), so a token costs the same at
    any length. With `context` (the prompt) the text is the prompt's continuation: its first
    piece keeps the space SentencePiece drops at the start of a text (" Paris", as vLLM)."""

    def __init__(self, tokenizer: Any, context: list[int] | tuple = ()):
        self.decode = tokenizer.decode
        ctx = list(context[-1:])
        if ctx and self.decode(ctx).endswith("\ufffd"):
            ctx = []  # half a character gives no context
        self.ids: list[int] = ctx       # the context id, then the new ones
        self.start = len(ctx)           # where the new ids begin
        self.committed = ""  # the text of ids[start:_read], for good
        self._prefix, self._read = 0, len(ctx)

    def add(self, ids: list[int]) -> str:
        """Append `ids`; returns the text of the new ids so far (ending in one U+FFFD per
        byte while a character is incomplete)."""
        self.ids += ids
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        tail = now[len(before):]
        if tail and not now.endswith("\ufffd"):  # whole characters: commit them
            self.committed += tail
            self._prefix, self._read = self._read, len(self.ids)
            return self.committed
        return self.committed + tail


__all__ = ["TextDecoder"]
