"""Q5_K: Q4_K with a fifth bit per value: 256-value super-blocks of 8 sub-blocks with 6-bit scales and mins.

Layout: d, dmin | 12 bytes of scales and mins (as Q4_K) | qh (32 bytes) | qs (128 bytes of nibbles).
Value l of sub-block j takes its fifth bit from bit j of qh[l].
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import bits, blocks, half, nibbles
from textcomplete.quant.formats.q4_k import scales_and_mins

TYPE = GGMLQuantizationType.Q5_K
BLOCK_SIZE = 256
BLOCK_BYTES = 176


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    scales, mins = scales_and_mins(b[..., 4:16])
    low = nibbles(b[..., 48:].unflatten(-1, (4, 32))).flatten(-3, -2)   # [..., n, 8, 32]
    q = (low | (bits(b[..., 16:48], 8) << 4)).float()
    return (q * (half(b, 0).unsqueeze(-1) * scales) - half(b, 2).unsqueeze(-1) * mins).flatten(-3)
