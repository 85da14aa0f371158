"""Server limits: request sizes, the bounded queue of engine requests, and optional per-key rate limits.

Everything here runs on the event loop thread, so plain counters need no locks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from textcomplete.api.errors import APIError


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts. Engine requests are one per prompt and candidate (prompts x best_of)."""

    max_queued_requests: int = 1024        # engine requests allowed to wait beyond those running
    max_request_body_bytes: int = 16 << 20
    request_body_timeout: float = 30.0     # seconds to receive a whole request body
    request_header_timeout: float = 10.0   # seconds to receive a request's line and headers
    max_prompts_per_request: int = 1024
    max_sequences_per_request: int = 1024  # prompts x best_of in one request
    requests_per_minute: int = 0           # per API key; 0 means no limit
    tokens_per_minute: int = 0             # per API key (prompt + most completion tokens); 0 means no limit
    kv_overcommit: float = 4.0             # requests in flight may need at most this many times the KV cache

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "requests_per_minute", "tokens_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        for name in ("max_request_body_bytes", "max_prompts_per_request", "max_sequences_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("request_body_timeout", "request_header_timeout", "kv_overcommit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def duration(seconds: float) -> str:
    """R54's reset format: "0s", "12ms", "1.5s", "6m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s"


def too_many(message: str, type: str, code: str, retry_after: float, retry: bool = True) -> APIError:
    """A 429 with Retry-After (whole seconds, at least 1); retry=False adds x-should-retry: false."""
    headers = {"retry-after": str(max(1, math.ceil(retry_after)))}
    if not retry:
        headers["x-should-retry"] = "false"
    return APIError(429, message, type=type, code=code, headers=headers)


@dataclass
class Admission:
    """The bounded queue, on two counts.

    Engine requests: those in flight may exceed those the engine runs at once by at most `max_queued`.
    KV tokens: each engine request claims the most tokens it can come to hold (its prompt plus all the
    completion tokens it may generate), and those in flight together claim at most `max_kv_tokens` (the KV
    cache times the overcommit factor). This bounds everything a request keeps while it runs (its tokens,
    logprobs, text and response), so no burst of large requests can push the server out of memory.
    A request over a bound waits for others to finish (429); one too large for the bound on its own is
    refused (400) before it gets here. The engine-request bound alone may be passed by one large request
    when nothing else is in flight."""

    max_running: int
    max_queued: int
    max_kv_tokens: int = 0      # 0: no KV-token bound
    in_flight: int = 0
    kv_tokens: int = 0

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queued

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.max_running)

    def fits_alone(self, kv_tokens: int) -> bool:
        return not self.max_kv_tokens or kv_tokens <= self.max_kv_tokens

    def admit(self, sequences: int, kv_tokens: int = 0) -> Ticket:
        if self.in_flight and self.in_flight + sequences > self.capacity:
            raise too_many(f"The server is at capacity: {self.waiting} requests are waiting and {sequences} more "
                           f"would pass the queue limit of {self.max_queued}. Please retry shortly.",
                           type="server_busy", code="queue_full", retry_after=1)
        if self.max_kv_tokens and self.kv_tokens + kv_tokens > self.max_kv_tokens:
            raise too_many(f"The server is at capacity: the requests in flight may need {self.kv_tokens} tokens of "
                           f"its KV cache, and this one up to {kv_tokens} more, past the limit of "
                           f"{self.max_kv_tokens}. Please retry shortly.", type="server_busy", code="queue_full",
                           retry_after=1)
        self.in_flight += sequences
        self.kv_tokens += kv_tokens
        return Ticket(self, sequences, kv_tokens)


@dataclass
class Ticket:
    """A request's place in flight; `release` is idempotent, so every exit path may call it."""

    admission: Admission
    sequences: int
    kv_tokens: int = 0
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.in_flight -= self.sequences
            self.admission.kv_tokens -= self.kv_tokens


@dataclass
class TokenBucket:
    """Refills continuously to `per_minute` over a minute; `take` spends or says how long to wait."""

    per_minute: int
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = float(self.per_minute)

    def _refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def take(self, amount: float, now: float) -> float:
        """0 when taken; otherwise the seconds until `amount` is available (nothing is taken)."""
        self._refill(now)
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) * 60.0 / self.per_minute

    def remaining(self, now: float) -> int:
        self._refill(now)
        return int(self.level)

    def until_full(self, now: float) -> float:
        self._refill(now)
        return (self.per_minute - self.level) * 60.0 / self.per_minute


class KeyLimiter:
    """Optional requests-per-minute and tokens-per-minute limits for each API key id."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _buckets(self, key_id: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        requests = self._requests.setdefault(key_id, TokenBucket(self.rpm)) if self.rpm else None
        tokens = self._tokens.setdefault(key_id, TokenBucket(self.tpm)) if self.tpm else None
        return requests, tokens

    def charge(self, key_id: str, tokens: int) -> None:
        """Spend one request and `tokens` tokens of the key's budgets, or raise a 429."""
        now = time.monotonic()
        requests, token_bucket = self._buckets(key_id)
        if token_bucket is not None and tokens > self.tpm:
            raise too_many(f"Request too large for {key_id} on tokens per min: Limit {self.tpm}, Requested "
                           f"{tokens}. Please reduce the prompt or max_tokens.", type="tokens",
                           code="rate_limit_exceeded", retry_after=60, retry=False)
        if requests is not None:
            wait = requests.take(1, now)
            if wait:
                raise too_many(f"Rate limit reached for {key_id} on requests per min: Limit {self.rpm}. Please try "
                               f"again in {duration(wait)}.", type="requests", code="rate_limit_exceeded",
                               retry_after=wait)
        if token_bucket is not None:
            wait = token_bucket.take(tokens, now)
            if wait:
                if requests is not None:
                    requests.level += 1   # not served: give the request back
                raise too_many(f"Rate limit reached for {key_id} on tokens per min: Limit {self.tpm}, Requested "
                               f"{tokens}. Please try again in {duration(wait)}.", type="tokens",
                               code="rate_limit_exceeded", retry_after=wait)

    def headers(self, key_id: str) -> dict[str, str]:
        """x-ratelimit-* (R54) for this key's budgets."""
        now = time.monotonic()
        requests, tokens = self._buckets(key_id)
        out = {}
        if requests is not None:
            out |= {"x-ratelimit-limit-requests": str(self.rpm),
                    "x-ratelimit-remaining-requests": str(requests.remaining(now)),
                    "x-ratelimit-reset-requests": duration(requests.until_full(now))}
        if tokens is not None:
            out |= {"x-ratelimit-limit-tokens": str(self.tpm),
                    "x-ratelimit-remaining-tokens": str(tokens.remaining(now)),
                    "x-ratelimit-reset-tokens": duration(tokens.until_full(now))}
        return out
