"""Q5_0: blocks of 32 values, a float16 scale d, 32 fifth bits, 16 bytes of nibbles; value = (q - 16) * d.

Layout per block: d | qh (4 bytes, little-endian: bit i is value i's fifth bit) | qs (as Q4_0).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import bits, blocks, half, nibbles

TYPE = GGMLQuantizationType.Q5_0
BLOCK_SIZE = 32
BLOCK_BYTES = 22


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    high = bits(b[..., 2:6], 8).transpose(-1, -2).flatten(-2)  # [..., n, 32]: bit i of the 32-bit word
    q = (nibbles(b[..., 6:]).flatten(-2) | (high << 4)).float() - 16
    return (q * half(b, 0)).flatten(-2)
