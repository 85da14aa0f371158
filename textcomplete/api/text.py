"""Incremental detokenizing of one choice, with stop strings held back and cut out.

Streamed text must equal non-streamed text, so both build their output through `ChoiceText`:
text is released only when it cannot still become (part of) a stop sequence or an unfinished
UTF-8 character, and the first stop sequence ends the choice with the text before it.
"""

from __future__ import annotations

from textcomplete.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


def stable_prefix(text: str) -> str:
    """Text without a trailing unfinished character (shown by the decoder as U+FFFD)."""
    return text.rstrip(REPLACEMENT)


def overlap_with_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


class ChoiceText:
    """The generated tokens of one choice and the text they decode to."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.token_ids: list[int] = []
        self.token_starts: list[int] = []   # offset of each token's text within the generated text
        self.text = ""                      # stable decoded text so far (never shrinks)
        self.stopped_at: int | None = None  # where a stop sequence begins, once one is seen
        self._searched = 0

    def add(self, token_ids: tuple[int, ...] | list[int]) -> None:
        for token in token_ids:
            if self.stopped_at is not None:
                return
            self.token_starts.append(len(self.text))
            self.token_ids.append(token)
            decoded = stable_prefix(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
            if len(decoded) >= len(self.text):
                self.text = decoded
            self._find_stop()

    def _find_stop(self) -> None:
        if not self.stops:
            return
        start = max(0, self._searched - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped_at = min(hits)
        self._searched = len(self.text)

    @property
    def final_text(self) -> str:
        return self.text if self.stopped_at is None else self.text[:self.stopped_at]

    def releasable(self, finished: bool) -> int:
        """How much of the text may be shown now: all of it at the end, else what no stop can claim."""
        if finished or self.stopped_at is not None:
            return len(self.final_text)
        return len(self.text) - overlap_with_stop_prefix(self.text, self.stops)

    def tokens_before(self, limit: int, finished: bool) -> int:
        """How many tokens belong to the first `limit` characters (at the end: every token before a stop)."""
        if finished and self.stopped_at is None:
            return len(self.token_ids)
        count = 0
        while count < len(self.token_ids) and self.token_starts[count] < limit:
            count += 1
        return count
