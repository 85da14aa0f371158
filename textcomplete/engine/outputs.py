"""What the engine hands back per step: new token ids with their log-probabilities.

Plain frozen dataclasses over ints and floats; no tensors cross this boundary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its log-probability and the most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """The increment one engine step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    # One entry per new token when the request asked for logprobs, else empty.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Prompt positions 1.. (position 0 has no context) when prompt logprobs were asked for; they
    # arrive in order, possibly over several steps while the prompt is prefilled in chunks.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None     # "stop" (end-of-text or stop token), "length" or "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
