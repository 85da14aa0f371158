"""Layers shared by the architectures: norms, rotary embedding (its frequencies: rope.py), attention over the
paged KV cache.

Tensors are flat over tokens: a step's tokens from all requests are one [num_tokens, ...] batch,
and `AttentionMetadata` (built by the model runner) says which cache slots each token reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# rope_kind is re-exported: the architectures import it from here
from textcomplete.models.rope import RopeFrequencies, rope_kind  # noqa: F401


@dataclass
class PrefillSpan:
    """Queries [q_start, q_end) of one request attend to its first `num_keys` cached positions under `mask`.

    The queries are the span's last positions: num_keys - (q_end - q_start) .. num_keys - 1.
    """

    q_start: int
    q_end: int
    block_table: torch.Tensor          # [num_blocks] long: the blocks holding positions 0..num_keys-1
    num_keys: int
    mask: torch.Tensor | None          # [q_len, num_keys] bool, None when plainly causal and square
    _windows: dict[int, tuple[int, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    def windowed(self, window: int) -> tuple[int, torch.Tensor | None]:
        """(first key position, mask over keys first..num_keys-1) for a layer that sees only `window` keys.

        A query at position p sees keys p - window < k <= p (the Hugging Face convention); keys before the
        earliest query's window are not gathered at all.
        """
        if window not in self._windows:
            first_q = self.num_keys - (self.q_end - self.q_start)
            first_key = max(0, first_q - window + 1)
            if first_key == 0 and self.num_keys <= window:
                self._windows[window] = (0, self.mask)        # the window reaches back to position 0
            else:
                device = self.block_table.device
                q_pos = torch.arange(first_q, self.num_keys, device=device)[:, None]
                k_pos = torch.arange(first_key, self.num_keys, device=device)[None, :]
                self._windows[window] = (first_key, (k_pos <= q_pos) & (k_pos > q_pos - window))
        return self._windows[window]


@dataclass
class AttentionMetadata:
    """Where each token of a step writes its K/V and which keys each query reads.

    The first `num_decode_tokens` tokens are single-token chunks (one per request) batched together;
    the rest are prefill spans attended one request at a time. Decodes gather exactly their keys' slots
    (padded to the longest, masked); prefill spans gather whole blocks.
    """

    slot_mapping: torch.Tensor                       # [num_tokens] long: block * block_size + offset
    num_decode_tokens: int = 0
    decode_key_slots: torch.Tensor | None = None     # [num_decode, max_keys] long, contiguous: each one's key slots
    decode_key_mask: torch.Tensor | None = None      # [num_decode, 1, 1, max_keys] bool; None when no padding
    decode_key_lens: torch.Tensor | None = None      # [num_decode] long: how many of each row's key slots are real
    prefills: list[PrefillSpan] = field(default_factory=list)
    _windows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    def windowed_decode_keys(self, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(key slots [num_decode, <= window], mask or None): each decode's last `window` keys only."""
        if window not in self._windows:
            slots, lens = self.decode_key_slots, self.decode_key_lens
            if window >= slots.shape[1]:
                self._windows[window] = (slots, self.decode_key_mask)
            else:
                columns = (lens - window).clamp(min=0)[:, None] + torch.arange(window, device=slots.device)
                valid = columns < lens[:, None]
                windowed = slots.gather(1, columns.clamp(max=slots.shape[1] - 1))
                self._windows[window] = (windowed, None if bool(valid.all()) else valid[:, None, None, :])
        return self._windows[window]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Lower precisions: normalise in float32, as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half ("neox") rotary embedding over the first `rotary_dim` dims of each head, for PyTorch models.

    Its frequencies and attention factor are those of a `rope.RopeFrequencies` (which see for `scaling` and the
    context length); this module turns them into torch cos/sin and applies them.
    """

    def __init__(self, rotary_dim: int, max_positions: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        self.frequencies = RopeFrequencies(rotary_dim, max_positions, base, scaling)
        self.rotary_dim, self.kind, self.scaling = rotary_dim, self.frequencies.kind, self.frequencies.scaling
        self._take_frequencies()

    def set_context_length(self, length: int) -> None:
        """Fix the frequencies for contexts of up to `length` tokens (only longrope and dynamic depend on it)."""
        self.frequencies.set_context_length(length)
        self._take_frequencies()

    def _take_frequencies(self) -> None:
        # A plain attribute, not a buffer: never part of a checkpoint. On the CPU even when the model is
        # constructed on the meta device; moved on first use.
        self.inv_freq = torch.from_numpy(self.frequencies.inv_freq)   # float32 [rotary_dim / 2]
        self.attention_scaling = self.frequencies.attention_scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [num_tokens, 1, rotary_dim]; the sin's first half is negated (see `apply`).

        Equal to `RopeFrequencies.cos_sin` (in float32): float32 angles, cos and sin in float64 rounded once.
        """
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = (positions.float()[:, None] * self.inv_freq[None, :]).double()   # [num_tokens, rotary_dim / 2]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:   # YaRN's and LongRoPE's factor, on cos and sin as transformers does
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.float().to(dtype), sin.float().to(dtype)
        return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, num_heads, head_dim]; cos, signed_sin from `cos_sin`.

        rotate_half(x) * sin == swap_halves(x) * signed_sin, and swapping halves is one flip of a
        [2, half] view: three operators per call instead of the slices and concatenations.
        """
        rot = cos.shape[-1]
        x_rot = x[..., :rot]
        swapped = x_rot.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
        out = torch.addcmul(x_rot * cos, swapped, signed_sin)
        return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


class PagedAttention(nn.Module):
    """Scaled dot-product attention whose keys and values live in the paged KV cache.

    The model runner assigns `kv_cache` ([num_blocks, block_size, 2, num_kv_heads, head_dim]: a slot's key
    and value side by side, so one gather fetches both; in the model's dtype or a narrower one, rounded on
    writing) before use. Options of the families that need them:
    `sliding_window` (a query sees only the last that many positions, itself included), `scale` (instead of
    1/sqrt(head_dim)) and `softcap` (scores pass through softcap * tanh(score / softcap) before the softmax).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, sliding_window: int | None = None,
                 scale: float | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window or None
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.softcap = softcap or None
        self.kv_cache: torch.Tensor | None = None
        # The compiled module whose prompt_attention runs prefill spans on float32 queries (the engine sets it;
        # None: PyTorch's scaled_dot_product_attention over the gathered blocks).
        self.native: object | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]."""
        slots = self.kv_cache.view(-1, 2, self.num_kv_heads, self.head_dim)   # [num_slots, 2, kv_heads, dim]
        slots[:, 0].index_copy_(0, meta.slot_mapping, k.to(slots.dtype))   # the cache may be narrower
        slots[:, 1].index_copy_(0, meta.slot_mapping, v.to(slots.dtype))
        n = meta.num_decode_tokens
        decoded = None
        if n:
            key_slots, mask = meta.decode_key_slots, meta.decode_key_mask
            if self.sliding_window:
                key_slots, mask = meta.windowed_decode_keys(self.sliding_window)
            kv = slots.index_select(0, key_slots.view(-1)).to(q.dtype)
            kv = kv.view(n, -1, 2, self.num_kv_heads, self.head_dim)
            decoded = self._attend(q[:n].unsqueeze(2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
                                   mask, causal=False).squeeze(2)   # [n, heads, dim]
            if not meta.prefills:
                return decoded
        out = torch.empty_like(q)
        if decoded is not None:
            out[:n] = decoded
        native = self.native is not None and self.softcap is None and q.dtype == torch.float32
        for span in meta.prefills:
            if native:   # reads the cache in place: no gathered copy of the request's blocks
                out[span.q_start:span.q_end] = self.native.prompt_attention(
                    q[span.q_start:span.q_end].contiguous(), self.kv_cache, span.block_table, span.num_keys,
                    self.sliding_window or 0, self.scale)
                continue
            first_key, mask = span.windowed(self.sliding_window) if self.sliding_window else (0, span.mask)
            first_block, skip = divmod(first_key, self.kv_cache.shape[1])
            # index_select copies whole blocks; indexing by a tensor ran a per-element kernel, 6x slower.
            blocks = self.kv_cache.index_select(0, span.block_table[first_block:])
            kv = blocks.view(-1, 2, self.num_kv_heads, self.head_dim)
            kv = kv[skip:skip + span.num_keys - first_key].to(q.dtype)
            keys, values = kv[:, 0].transpose(0, 1).unsqueeze(0), kv[:, 1].transpose(0, 1).unsqueeze(0)
            queries = q[span.q_start:span.q_end].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, dim]
            o = self._attend(queries, keys, values, mask, causal=mask is None)
            out[span.q_start:span.q_end] = o.squeeze(0).transpose(0, 1)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        """q: [b, heads, q_len, dim]; k, v: [b, kv_heads, keys, dim]; mask True where a key is seen."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                                  scale=self.scale)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
