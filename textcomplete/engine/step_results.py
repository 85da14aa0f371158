"""What a step's chunks produced, from the logits of the rows that need them: prompt logprobs owed, and the next
token of each chunk that completes its sequence (sampled). Shared by both runners (runner.py with torch,
native_runner.py without); numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from textcomplete.engine.outputs import TokenLogprob
from textcomplete.engine.sampler import Sampler, log_softmax, token_logprobs
from textcomplete.engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    """What one scheduled chunk produced: a sampled token (if it completed the sequence), prompt logprobs."""

    chunk: ScheduledChunk
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None    # this chunk's request failed alone; the others in the step are unaffected


def collect_results(chunks: list[ScheduledChunk], logits_of: Callable[[list[int]], np.ndarray],
                    sampler: Sampler) -> list[ChunkResult]:
    """The chunks' results, in step order (the chunks' rows one after another); logits_of(rows) gives the
    float32 logits [len(rows), vocab] of those rows of the step's hidden states."""
    results = [ChunkResult(c) for c in chunks]
    rows, row_owner = [], []                  # hidden rows whose logits are needed, and why
    offset = 0
    for i, c in enumerate(chunks):
        for p in _prompt_logprob_positions(c):
            rows.append(offset + p - c.start)
            row_owner.append((i, p))
        if c.completes_sequence and c.request.params.max_tokens != 0:
            rows.append(offset + c.num_tokens - 1)
            row_owner.append((i, None))
        offset += c.num_tokens
    if not rows:
        return results
    logits = logits_of(rows)
    _fill_prompt_logprobs(results, logits, row_owner)
    _fill_samples(results, logits, row_owner, sampler)
    return results


def _fill_prompt_logprobs(results: list[ChunkResult], logits: np.ndarray,
                          row_owner: list[tuple[int, int | None]]) -> None:
    picks = [(r, i, p) for r, (i, p) in enumerate(row_owner) if p is not None]
    if not picks:
        return
    logprobs = log_softmax(logits[[r for r, _, _ in picks]])
    targets = [results[i].chunk.request.token_ids[p + 1] for _, i, p in picks]
    ks = [results[i].chunk.request.params.prompt_logprobs for _, i, _ in picks]
    for (_, i, _), entry in zip(picks, token_logprobs(logprobs, targets, ks)):
        results[i].prompt_logprobs.append(entry)


def _fill_samples(results: list[ChunkResult], logits: np.ndarray, row_owner: list[tuple[int, int | None]],
                  sampler: Sampler) -> None:
    picks = [(r, i) for r, (i, p) in enumerate(row_owner) if p is None]
    if not picks:
        return
    try:
        sampled = sampler(logits[[r for r, _ in picks]], [results[i].chunk.request for _, i in picks])
    except Exception:   # noqa: BLE001 - one request's settings broke the batch: find it, spare the others
        log.exception("batched sampling failed; sampling each request alone")
        for r, i in picks:
            try:
                one = sampler(logits[[r]], [results[i].chunk.request])
            except Exception as exc:   # noqa: BLE001 - fails this request only
                results[i].error = f"sampling failed: {exc}"
                continue
            results[i].token_id, results[i].logprob = one.token_ids[0], one.logprobs[0]
        return
    for (_, i), token, lp in zip(picks, sampled.token_ids, sampled.logprobs):
        results[i].token_id, results[i].logprob = token, lp


def _prompt_logprob_positions(chunk: ScheduledChunk) -> range:
    """Positions p in this chunk whose logits score prompt token p + 1 and are still owed."""
    r = chunk.request
    if not r.wants_prompt_logprobs():
        return range(0)
    return range(max(chunk.start, r.next_prompt_logprob_pos - 1), min(chunk.end, r.prompt_len - 1))
