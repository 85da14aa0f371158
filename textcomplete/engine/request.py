"""The request state machine: a counter of computed tokens against known tokens.

A request is not in a "prefill" or "decode" phase; each step computes some of its known but
uncomputed tokens, and when none remain it samples one more.
"""

from __future__ import annotations

import enum

import numpy as np

from textcomplete.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence being generated. Owned by the engine loop; nothing else mutates it."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival: int) -> None:
        if not prompt_token_ids:
            raise ValueError("a prompt needs at least one token")
        self.request_id = request_id
        self.params = params
        self.arrival = arrival                       # admission order, for preempting the newest
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt followed by generated tokens
        self.num_computed_tokens = 0                 # tokens whose K/V are in the cache
        self.block_table: list[int] = []             # physical KV block ids, in order
        self.block_hashes: list[int] = []            # chained hashes of the full blocks, in order
        self.num_cached_tokens: int | None = None    # prompt tokens served from the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Next prompt position whose logprob is still owed to the caller; survives preemption so
        # recomputed positions are not reported twice.
        self.next_prompt_logprob_pos = 1
        self.generator: np.random.Generator | None = None
        if params.seed is not None:
            # numpy seeds are non-negative: fold the signed seed onto them one-to-one (0, -1, 1, -2, ...).
            self.generator = np.random.default_rng(2 * params.seed if params.seed >= 0 else -2 * params.seed - 1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.next_prompt_logprob_pos < self.prompt_len

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
