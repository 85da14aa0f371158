"""BF16: bfloat16 values, the top half of a float32 (a block is one value).

Decoding is a widening: the 16 stored bits become the high bits of the float32.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import viewed

TYPE = GGMLQuantizationType.BF16
BLOCK_SIZE = 1
BLOCK_BYTES = 2


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    return viewed(raw, torch.bfloat16).float()
