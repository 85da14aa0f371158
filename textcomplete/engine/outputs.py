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
    finish_reason: str | None = None     # "stop" (end-of-text or stop token), "length", "abort" or "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None             # with finish_reason "error": what failed this request alone


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters, taken on the engine thread (for metrics and headers)."""

    running: int = 0                  # engine requests being computed
    waiting: int = 0                  # engine requests queued for admission (incl. preempted ones)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0           # held by requests
    kv_blocks_free: int = 0           # never used, or cached and held by none (reusable)
    kv_blocks_cached: int = 0         # blocks whose contents the prefix cache can serve
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    prefix_cache_evictions: int = 0
