"""Q5_1: blocks of 32 values, float16 scale d and offset m, fifth bits, nibbles; value = q * d + m.

Layout per block: d | m | qh (4 bytes, bit i is value i's fifth bit) | qs (16 bytes, as Q4_1).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import bits, blocks, half, nibbles

TYPE = GGMLQuantizationType.Q5_1
BLOCK_SIZE = 32
BLOCK_BYTES = 24


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    high = bits(b[..., 4:8], 8).transpose(-1, -2).flatten(-2)  # [..., n, 32]
    q = (nibbles(b[..., 8:]).flatten(-2) | (high << 4)).float()
    return (q * half(b, 0) + half(b, 2)).flatten(-2)
