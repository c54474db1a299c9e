"""Token ids to text, as they arrive: incremental decoding and stop strings.

A choice's text is always ``decode(tokens)`` (special tokens skipped), cut before the first stop string. While it
streams, what is sent is the part of that text that can no longer change: a trailing replacement character (a
multi-byte character split across tokens) and a tail that could still become a stop string are held back until
the next tokens (or the end) decide them, so the concatenated stream equals the text of the same request
without streaming.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TextTracker", "decode"]


def decode(tokenizer: Any, tokens: list[int]) -> str:
    """The text of ``tokens``: special tokens (EOS) skipped, spaces as the tokens have them."""
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextTracker:
    """One choice's tokens and text.

    ``push(tokens, final)`` adds tokens and returns the new text that is safe to send; ``stopped`` turns true when
    a stop string appeared (the text then ends before it and further tokens are ignored). ``tokens`` holds the
    tokens that count for the choice: up to the one that completed the stop string.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # a partial stop string is at most this long
        self.tokens: list[int] = []
        self.text = ""  # the decided text so far (never shrinks)
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, tokens: list[int], final: bool = False) -> str:
        if not self.stopped:
            for token in tokens:
                self.tokens.append(token)
                if self.stops and self._find_stop():
                    break
            if not self.stopped:
                full = decode(self.tokenizer, self.tokens)
                if not final:
                    full = full.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next bytes
                    full = full[: max(len(self.text), len(full) - self.hold)] if self.stops else full
                if len(full) > len(self.text) and full.startswith(self.text):
                    self.text = full
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _find_stop(self) -> bool:
        full = decode(self.tokenizer, self.tokens)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        self.stopped = True
        if cut >= len(self.text):
            self.text = full[:cut]
        return True
