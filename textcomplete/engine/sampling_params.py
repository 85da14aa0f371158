"""Per-request generation settings, validated once when the request is made.

The API layer converts OpenAI fields into this; the engine reads nothing else of a request's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request (one choice); the engine's whole view of the request options."""

    max_tokens: int | None = 16          # None: until a stop token or the context is full
    temperature: float = 1.0             # 0 means greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0        # OpenAI's additive penalties, over generated tokens only
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-text tokens
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None          # top-k alternatives per generated token (0: the chosen one only)
    prompt_logprobs: int | None = None   # likewise for prompt tokens (the echo + logprobs case)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be at least 0")
        if self.temperature < 0:
            raise ValueError("temperature must be at least 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
