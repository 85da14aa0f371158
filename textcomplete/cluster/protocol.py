"""What crosses the process boundary between the front end and the engine replicas.

Small frozen dataclasses over ints, floats and the engine's own output types; Ray pickles them.
"""

from __future__ import annotations

from dataclasses import dataclass

from textcomplete.engine.outputs import EngineStats, RequestOutput
from textcomplete.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ReplicaRequest:
    """One engine request, with the routing key the request router reads."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # The chained hashes of the prompt's reusable full blocks (`reusable_prefix_hashes`): the very keys
    # of the replicas' prefix caches, so the router can send a request where its prefix is cached.
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReplicaOutput:
    """One engine output, labelled with the replica that produced it and that replica's load right after."""

    replica: str
    pid: int
    output: RequestOutput
    stats: EngineStats


@dataclass(frozen=True)
class ReplicaDescription:
    """A replica's fixed facts, read once at start: the front end tokenizes and validates with them."""

    replica: str
    pid: int
    node: str
    tokenizer: object           # textcomplete.tokenizer.Tokenizer
    fingerprint: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    block_size: int
    num_blocks: int
