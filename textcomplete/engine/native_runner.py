"""The model runner without torch: scheduler output -> numpy arrays -> the native layer stack -> sampled tokens.

It does what `ModelRunner` does for a `NativeLlama` (textcomplete/models/native_llama.py): decode rows first,
batched, then each prompt chunk; the same results, sampler and logprob bookkeeping (step_results.py). The KV
caches belong to the model's layer stack, one [num_slots, 2, kv_heads, head_dim] array per layer, slot =
block_id * block_size + offset.
"""

from __future__ import annotations

import numpy as np

from textcomplete.engine.sampler import Sampler
from textcomplete.engine.scheduler import ScheduledChunk, SchedulerOutput
from textcomplete.engine.step_results import ChunkResult, collect_results
from textcomplete.kernels.library import PromptChunk
from textcomplete.models.native_llama import NativeLlama


class NativeRunner:
    def __init__(self, model: NativeLlama, num_blocks: int, block_size: int, cache_dtype: str, direct_rows: int,
                 seed: int, int8: bool = False) -> None:
        self.model, self.block_size, self.direct_rows = model, block_size, direct_rows
        self.sampler = Sampler(seed)
        model.allocate(num_blocks, block_size, cache_dtype, direct_rows, int8)

    def execute(self, sched: SchedulerOutput) -> list[ChunkResult]:
        # Single-token chunks (decodes) first, batched in attention; longer chunks follow one by one.
        chunks = sorted(sched.chunks, key=lambda c: c.num_tokens > 1)
        decodes = [c for c in chunks if c.num_tokens == 1]
        ids = np.array([t for c in chunks for t in c.request.token_ids[c.start:c.end]], dtype=np.int64)
        positions = np.concatenate([np.arange(c.start, c.end, dtype=np.int64) for c in chunks])
        tables = [self._blocks(c) for c in chunks]
        slots = np.concatenate([self._slots(table, np.arange(c.start, c.end)) for c, table in zip(chunks, tables)])
        width = max((c.end for c in decodes), default=1)
        key_slots = np.zeros((len(decodes), width), dtype=np.int64)   # padding slot 0, past each row's length
        for i, (c, table) in enumerate(zip(decodes, tables)):
            key_slots[i, :c.end] = self._slots(table, np.arange(c.end))
        key_lens = np.array([c.end for c in decodes], dtype=np.int64)
        prompts = [PromptChunk(c.num_tokens, table, c.end) for c, table in zip(chunks[len(decodes):],
                                                                              tables[len(decodes):])]
        hidden = self.model.hidden_states(ids, positions, slots, key_slots, key_lens, prompts)
        return collect_results(chunks, lambda rows: self.model.logits(hidden[rows], self.direct_rows), self.sampler)

    def _blocks(self, chunk: ScheduledChunk) -> np.ndarray:
        """The blocks holding positions 0..end-1 of the chunk's request."""
        return np.array(chunk.request.block_table[:-(-chunk.end // self.block_size)], dtype=np.int64)

    def _slots(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return table[positions // self.block_size] * self.block_size + positions % self.block_size
