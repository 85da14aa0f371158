"""Q4_1: blocks of 32 values, float16 scale d and offset m, then 4-bit quants; value = q * d + m.

Layout per block: d | m | qs (16 bytes, low nibbles = values 0..15, high nibbles = values 16..31).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import blocks, half, nibbles

TYPE = GGMLQuantizationType.Q4_1
BLOCK_SIZE = 32
BLOCK_BYTES = 20


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    q = nibbles(b[..., 4:]).flatten(-2).float()                # [..., n, 32]
    return (q * half(b, 0) + half(b, 2)).flatten(-2)
