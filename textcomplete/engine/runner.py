"""The model runner: scheduler output -> tensors -> forward pass -> sampled tokens and logprobs.

The only place that builds tensors. It owns the KV cache tensors: one [num_blocks, block_size, 2,
kv_heads, head_dim] tensor per layer (key and value of a slot side by side), slot = block_id * block_size + offset.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from textcomplete.engine.sampler import Sampler
from textcomplete.engine.scheduler import ScheduledChunk, SchedulerOutput
from textcomplete.engine.step_results import ChunkResult, collect_results
from textcomplete.models.layers import AttentionMetadata, PagedAttention, PrefillSpan
from textcomplete.models.mapping import zeroed_pages
from textcomplete.models.spec import ModelSpec


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU, pages that become resident only when first written (mapping.zeroed_pages)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape) * dtype.itemsize
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(zeroed_pages(count)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, seed: int) -> None:
        self.model, self.spec, self.block_size, self.device = model, spec, block_size, device
        self.sampler = Sampler(seed)
        shape = (num_blocks, block_size, 2, spec.num_kv_heads, spec.head_dim)
        for attn in (m for m in model.modules() if isinstance(m, PagedAttention)):
            attn.kv_cache = _zeroed(shape, kv_dtype, device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[ChunkResult]:
        # Single-token chunks (decodes) first, batched in attention; longer chunks follow one by one.
        chunks = sorted(sched.chunks, key=lambda c: c.num_tokens > 1)
        input_ids, positions, meta = self._prepare(chunks)
        hidden = self.model(input_ids, positions, meta)   # [num_tokens, hidden]
        return self._results(chunks, hidden)

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        pos: list[int] = []
        for c in chunks:
            ids.extend(c.request.token_ids[c.start:c.end])
            pos.extend(range(c.start, c.end))
        decodes = [c for c in chunks if c.num_tokens == 1]   # `execute` sorts them first
        tables = self._block_tables(chunks)
        meta = AttentionMetadata(slot_mapping=self._slots_of(chunks, tables), num_decode_tokens=len(decodes))
        if decodes:
            ends = [c.end for c in decodes]
            width = max(ends)
            tables = tables[:len(decodes)]
            offsets = torch.arange(self.block_size, device=self.device)
            key_slots = (tables[:, :, None] * self.block_size + offsets).view(len(decodes), -1)[:, :width]
            meta.decode_key_slots = key_slots.contiguous()   # a column slice: the native layers read it flat
            meta.decode_key_lens = torch.tensor(ends, dtype=torch.long, device=self.device)
            if min(ends) < width:   # shorter requests' padding keys are masked out
                keys = torch.arange(width, device=self.device)
                meta.decode_key_mask = (keys[None, :] < meta.decode_key_lens[:, None])[:, None, None, :]
        offset = len(decodes)
        for c in chunks[len(decodes):]:
            mask = None
            if c.start:   # queries at positions start.. see every earlier key: causal, offset
                q_pos = torch.arange(c.start, c.end, device=self.device)[:, None]
                mask = torch.arange(c.end, device=self.device)[None, :] <= q_pos
            table = torch.tensor(c.request.block_table[:-(-c.end // self.block_size)], device=self.device)
            meta.prefills.append(PrefillSpan(offset, offset + c.num_tokens, table, c.end, mask))
            offset += c.num_tokens
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return as_long(ids), as_long(pos), meta

    def _block_tables(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """The blocks holding positions 0..end-1 of each chunk's request, padded with block 0."""
        used = [c.request.block_table[:-(-c.end // self.block_size)] for c in chunks]
        width = max(len(u) for u in used)
        rows = [u + [0] * (width - len(u)) for u in used]
        return torch.tensor(rows, dtype=torch.long, device=self.device)   # [n, max_blocks]

    def _slots_of(self, chunks: list[ScheduledChunk], tables: torch.Tensor) -> torch.Tensor:
        """Cache slot of every token computed this step, in step order (`tables` from `_block_tables`)."""
        parts = []
        for i, c in enumerate(chunks):
            p = torch.arange(c.start, c.end, device=self.device)
            parts.append(tables[i, p // self.block_size] * self.block_size + p % self.block_size)
        return torch.cat(parts)

    def _results(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> list[ChunkResult]:
        def logits_of(rows: list[int]) -> np.ndarray:
            # float32 on the host: the sampler and the logprob bookkeeping are numpy only
            picked = hidden[torch.tensor(rows, device=self.device)]
            return self.model.compute_logits(picked).to("cpu").float().numpy()
        return collect_results(chunks, logits_of, self.sampler)
