"""F16: IEEE half-precision values (a block is one value).

Every float16 is exactly a float32, so decoding is a widening.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import viewed

TYPE = GGMLQuantizationType.F16
BLOCK_SIZE = 1
BLOCK_BYTES = 2


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    return viewed(raw, torch.float16).float()
