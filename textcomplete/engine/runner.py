"""The model runner: scheduler output -> tensors -> forward pass -> sampled tokens and logprobs.

The only place that builds tensors. It owns the KV cache tensors: one [num_blocks, block_size, 2,
kv_heads, head_dim] tensor per layer (key and value of a slot side by side), slot = block_id * block_size + offset.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field

import torch

from textcomplete.engine.outputs import TokenLogprob
from textcomplete.engine.sampler import Sampler, token_logprobs
from textcomplete.engine.scheduler import ScheduledChunk, SchedulerOutput
from textcomplete.models.layers import AttentionMetadata, PagedAttention, PrefillSpan
from textcomplete.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    """What one scheduled chunk produced: a sampled token (if it completed the sequence), prompt logprobs."""

    chunk: ScheduledChunk
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None    # this chunk's request failed alone; the others in the step are unaffected


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * dtype.itemsize


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU it is an anonymous private mapping: its pages come from the system already
    zero and become resident only when first written, so a cache costs memory as requests fill it.

    The mapping asks for small pages. numpy asks for huge pages for its large arrays (the system's policy
    often grants them on request), and the first write to a huge page stops the writer while the kernel finds
    (compacting memory if it must) and clears 2 MiB. On a 2-core VM that took 8 ms a page: 6.2 s to fill a
    1.6 GB cache, 0.2-0.5 s added to the 128-token prompt of a 1.7B model (2.0 s with small pages), and about
    1 ms to its decode steps. A small page's first write costs about a microsecond."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape) * dtype.itemsize
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, count, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    # The tensor holds the mapping (through the buffer it exports) for as long as it lives.
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)


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
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).to("cpu")
        self._fill_prompt_logprobs(results, logits, row_owner)
        self._fill_samples(results, logits, row_owner)
        return results

    def _fill_prompt_logprobs(self, results: list[ChunkResult], logits: torch.Tensor,
                              row_owner: list[tuple[int, int | None]]) -> None:
        picks = [(r, i, p) for r, (i, p) in enumerate(row_owner) if p is not None]
        if not picks:
            return
        logprobs = torch.log_softmax(logits[[r for r, _, _ in picks]], dim=-1)
        targets = [results[i].chunk.request.token_ids[p + 1] for _, i, p in picks]
        ks = [results[i].chunk.request.params.prompt_logprobs for _, i, _ in picks]
        for (_, i, _), entry in zip(picks, token_logprobs(logprobs, targets, ks)):
            results[i].prompt_logprobs.append(entry)

    def _fill_samples(self, results: list[ChunkResult], logits: torch.Tensor,
                      row_owner: list[tuple[int, int | None]]) -> None:
        picks = [(r, i) for r, (i, p) in enumerate(row_owner) if p is None]
        if not picks:
            return
        try:
            sampled = self.sampler(logits[[r for r, _ in picks]], [results[i].chunk.request for _, i in picks])
        except Exception:   # noqa: BLE001 - one request's settings broke the batch: find it, spare the others
            log.exception("batched sampling failed; sampling each request alone")
            for r, i in picks:
                try:
                    one = self.sampler(logits[[r]], [results[i].chunk.request])
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
