"""Q6_K: super-blocks of 256 six-bit values in 16 groups of 16, each with an int8 scale; value = d*s*(q-32).

Layout: ql (128 bytes, low four bits) | qh (64 bytes, high two bits) | 16 int8 scales | d (float16, last).
Each half of 128 values uses 64 bytes of ql and 32 of qh: value 32t + l (t < 4, l < 32) takes the low nibble
of ql[l] (t=0), ql[l+32] (t=1), then their high nibbles (t=2, 3), and bits 2t, 2t+1 of qh[l].
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from textcomplete.quant.formats import blocks, half

TYPE = GGMLQuantizationType.Q6_K
BLOCK_SIZE = 256
BLOCK_BYTES = 210


def dequantize(raw: torch.Tensor) -> torch.Tensor:
    b = blocks(raw, BLOCK_BYTES)
    ql = b[..., 0:128].unflatten(-1, (2, 2, 32))               # [..., n, half, t % 2, l]
    low = torch.stack((ql & 0x0F, ql >> 4), dim=-3).flatten(-3, -2)    # [..., n, half, t, l]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    high = (b[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts) & 3   # [..., n, half, t, l]
    q = ((low | (high << 4)).float() - 32).reshape(*b.shape[:-1], 16, 16)
    scales = b[..., 192:208].view(torch.int8).float().unsqueeze(-1)     # [..., n, 16, 1]
    return (q * (half(b, 208).unsqueeze(-1) * scales)).flatten(-3)
