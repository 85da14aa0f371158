"""Q4_K: super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min.

Layout: d, dmin (float16) | 12 bytes of packed scales and mins | 128 bytes of nibbles. Sub-block j's value is
q * (d * scale_j) - dmin * min_j; bytes 32c..32c+31 hold sub-block 2c in their low nibbles, 2c+1 in their high.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import blocks, half, nibbles

TYPE = GGMLQuantizationType.Q4_K
BLOCK_SIZE = 256
BLOCK_BYTES = 144


def scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., 12] -> (scales, mins) float32 [..., 8, 1]. Bytes 0-3 hold scales 0-3 in their low six
    bits, bytes 4-7 mins 0-3; sub-blocks 4-7 take four bits from bytes 8-11 (scale low, min high nibble)
    and their top two bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    lo_s, lo_m, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat((lo_s & 63, (rest & 0x0F) | ((lo_s >> 6) << 4)), dim=-1)
    mins = torch.cat((lo_m & 63, (rest >> 4) | ((lo_m >> 6) << 4)), dim=-1)
    return scales.unsqueeze(-1).float(), mins.unsqueeze(-1).float()


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    scales, mins = scales_and_mins(b[..., 4:16])
    qs = b[..., 16:].unflatten(-1, (4, 32))                     # [..., n, 4, 32]
    q = nibbles(qs).flatten(-3, -2).float()                     # [..., n, 8, 32]: sub-block order
    return (q * (half(b, 0).unsqueeze(-1) * scales) - half(b, 2).unsqueeze(-1) * mins).flatten(-3)
