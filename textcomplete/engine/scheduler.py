"""Continuous batching: which requests compute how many tokens in the next step.

Pure Python over `Request` counters and the block allocator. Running requests go first (so a long
prompt never stalls decodes), then waiting ones are admitted while the token budget and the KV
blocks allow; when blocks run out the newest running request is preempted and recomputed later.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from textcomplete.engine.block_manager import BlockAllocator
from textcomplete.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `request`, starting at position `start`, are computed this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every known token is computed, so a new token is sampled."""
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of this step's chunks of more than one token: prompt chunks (a decode chunk is one token)."""
        return sum(c.num_tokens for c in self.chunks if c.num_tokens > 1)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.allocator = allocator
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # sorted by arrival: the newest is preempted first
        self.num_preemptions = 0
        self.prompt_tokens_looked_up = 0   # for the prefix cache hit rate
        self.prompt_tokens_cached = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_uncomputed_tokens, budget)
            if self._allocate_preempting(request, n, out):
                out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
                budget -= n
                i += 1
            # else the request preempted itself and left `running`; index i now holds the next one
        return budget

    def _allocate_preempting(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Find blocks for n more tokens, preempting newer requests; False if `request` itself yielded."""
        while not self.allocator.allocate(request, request.num_computed_tokens + n):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.allocator.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)   # popped newest first, so the oldest ends up in front
        out.preempted.append(request)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.allocator.reuse_cached_prefix(request)
            n = min(request.num_uncomputed_tokens, budget)
            if not self.allocator.allocate(request, request.num_computed_tokens + n):
                self.allocator.free(request)   # give back the cache hits; it is looked up again next time
                break
            if request.num_cached_tokens is None:   # the first admission's hits are what is reported
                request.num_cached_tokens = cached
                self.prompt_tokens_looked_up += request.prompt_len
                self.prompt_tokens_cached += min(cached, request.prompt_len)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and return its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.free(request)
        request.status = RequestStatus.FINISHED
