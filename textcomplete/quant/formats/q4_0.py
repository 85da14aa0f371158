"""Q4_0: blocks of 32 values, a float16 scale d then 16 bytes of 4-bit quants; value = (q - 8) * d.

Byte j holds value j in its low nibble and value j + 16 in its high nibble.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import blocks, half, nibbles

TYPE = GGMLQuantizationType.Q4_0
BLOCK_SIZE = 32
BLOCK_BYTES = 18


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    q = nibbles(b[..., 2:]).flatten(-2).float() - 8            # [..., n, 32]
    return (q * half(b, 0)).flatten(-2)
