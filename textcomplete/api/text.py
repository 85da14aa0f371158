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
    """The generated tokens of one choice and the text they decode to.

    Each new token decodes only a short window of the latest tokens, not the whole choice again: the window's
    text past that of its first tokens (up to `CONTEXT` tokens whose text is final) is what the new tokens
    add. A decoder may treat a sequence's first token specially (a leading space), so both texts start at the
    same token; a window whose start text holds U+FFFD may begin inside a character (a run of byte tokens is
    decoded as a whole), so such a window starts at the first token. The text is that of decoding every token
    at once, up to a trailing unfinished character.
    """

    CONTEXT = 4   # tokens of earlier text at the start of each window

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.token_ids: list[int] = []
        self.token_starts: list[int] = []   # offset of each token's text within the generated text
        self.text = ""                      # stable decoded text so far (never shrinks)
        self.stopped_at: int | None = None  # where a stop sequence begins, once one is seen
        self._searched = 0
        self._read = 0        # tokens whose text is final: self.text[:self._read_chars] and never redecoded
        self._read_chars = 0

    def add(self, token_ids: tuple[int, ...] | list[int]) -> None:
        for token in token_ids:
            if self.stopped_at is not None:
                return
            self.token_starts.append(len(self.text))
            self.token_ids.append(token)
            self._decode_window()
            self._find_stop()

    def _decode_window(self) -> None:
        start = max(0, self._read - self.CONTEXT)
        head = self.tokenizer.decode(self.token_ids[start:self._read], skip_special_tokens=True)
        if REPLACEMENT in head and start > 0:   # the window may begin inside a character: begin at the start
            start, head = 0, self.tokenizer.decode(self.token_ids[:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.token_ids[start:], skip_special_tokens=True)
        if window.startswith(head):
            text = self.text[:self._read_chars] + stable_prefix(window[len(head):])
        else:   # the new tokens changed earlier text (a run of byte tokens that is not yet valid UTF-8)
            window = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            text = stable_prefix(window)
        if len(text) >= len(self.text):
            self.text = text
        if not window.endswith(REPLACEMENT) and self.text == text:   # every character finished: final
            self._read, self._read_chars = len(self.token_ids), len(self.text)

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
