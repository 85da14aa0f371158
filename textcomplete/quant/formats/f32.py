"""F32: plain little-endian float32 values (a block is one value).

Decoding copies, so that callers never hold a writable view of a read-only mapped file.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import viewed

TYPE = GGMLQuantizationType.F32
BLOCK_SIZE = 1
BLOCK_BYTES = 4


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    return viewed(raw, torch.float32).clone()
