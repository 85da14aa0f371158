"""Q8_0: blocks of 32 values, a float16 scale d then 32 int8 quants; value = q * d.

Layout per block: d (2 bytes) | qs (32 x int8).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import blocks, half

TYPE = GGMLQuantizationType.Q8_0
BLOCK_SIZE = 32
BLOCK_BYTES = 34


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    q = b[..., 2:].view(torch.int8).float()                    # [..., n, 32]
    return (q * half(b, 0)).flatten(-2)
