"""Text answers decoded piece by piece while they are drawn, for streaming.

A :class:`TextStream` takes one row's tokens as they come and hands out the new text each one
adds, so that the pieces put together are exactly the finished answer (the whole answer decoded
at once, without special tokens and stripped). Text that could still change is held back:
leading and trailing whitespace (the answer is stripped), and an unfinished multi-byte character
(a byte-fallback piece decodes to U+FFFD until its last byte arrives).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TextStream:
    """One answer's ids in, its text out in pieces through ``emit(piece)``."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> None:
        """The next token of the answer; emits the text it completes (if any)."""
        self.ids.append(token)
        text = self.decode().rstrip()
        if text.endswith("\ufffd"):
            return
        self._send(text)

    def finish(self) -> str:
        """Emits whatever is held back and returns the whole answer."""
        answer = self.decode().strip()
        self._send(answer)
        return answer

    def decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def _send(self, text: str) -> None:
        # A decoded prefix stays a prefix for the tokenizers used here; if one ever did not, the
        # piece that no longer fits is not sent again and the rest waits for the final text.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.emit(piece)
