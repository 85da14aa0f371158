"""Layers shared by the architectures: norms, rotary embedding and attention over the paged KV cache.

Tensors are flat over tokens: a step's tokens from all requests are one [num_tokens, ...] batch,
and `AttentionMetadata` (built by the model runner) says which cache slots each token reads and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillSpan:
    """Queries [q_start, q_end) of one request attend to its first `num_keys` cached positions under `mask`."""

    q_start: int
    q_end: int
    block_table: torch.Tensor          # [num_blocks] long: the blocks holding positions 0..num_keys-1
    num_keys: int
    mask: torch.Tensor | None          # [q_len, num_keys] bool, None when plainly causal and square


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


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half ("neox") rotary embedding over the first `rotary_dim` dims of each head."""

    def __init__(self, rotary_dim: int, max_positions: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        # Built on the CPU even when the model is constructed on the meta device; moved on first use.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        inv_freq = 1.0 / (base ** exponents)
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind != "default":
            raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self.inv_freq = inv_freq   # a plain attribute, not a buffer: never part of a checkpoint

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [num_tokens, 1, rotary_dim]; the sin's first half is negated (see `apply`)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]   # [num_tokens, rotary_dim / 2]
        sin = freqs.sin()
        return (torch.cat((freqs, freqs), dim=-1).cos().to(dtype)[:, None, :],
                torch.cat((-sin, sin), dim=-1).to(dtype)[:, None, :])

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
    and value side by side, so one gather fetches both) before use.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]."""
        slots = self.kv_cache.view(-1, 2, self.num_kv_heads, self.head_dim)   # [num_slots, 2, kv_heads, dim]
        slots[:, 0].index_copy_(0, meta.slot_mapping, k)
        slots[:, 1].index_copy_(0, meta.slot_mapping, v)
        n = meta.num_decode_tokens
        decoded = None
        if n:
            kv = slots.index_select(0, meta.decode_key_slots.view(-1)).view(n, -1, 2, self.num_kv_heads, self.head_dim)
            decoded = F.scaled_dot_product_attention(
                q[:n].unsqueeze(2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
                attn_mask=meta.decode_key_mask, enable_gqa=True).squeeze(2)   # [n, heads, dim]
            if not meta.prefills:
                return decoded
        out = torch.empty_like(q)
        if decoded is not None:
            out[:n] = decoded
        for span in meta.prefills:
            kv = self.kv_cache[span.block_table].view(-1, 2, self.num_kv_heads, self.head_dim)[:span.num_keys]
            keys, values = kv[:, 0].transpose(0, 1).unsqueeze(0), kv[:, 1].transpose(0, 1).unsqueeze(0)
            queries = q[span.q_start:span.q_end].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, dim]
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=span.mask,
                                               is_causal=span.mask is None, enable_gqa=True)
            out[span.q_start:span.q_end] = o.squeeze(0).transpose(0, 1)
        return out
