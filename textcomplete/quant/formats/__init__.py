"""The GGUF block formats we run, one module each, and the byte-field helpers their decoders share.

A format module defines TYPE (a GGMLQuantizationType), BLOCK_SIZE (values per block), BLOCK_BYTES and
`dequantize(raw)`: uint8 [..., n_blocks * BLOCK_BYTES] -> float32 [..., n_blocks * BLOCK_SIZE], vectorized
over every block at once. textcomplete.quant finds the modules here by name; adding one adds a format.
"""

from __future__ import annotations

import torch


def blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """uint8 [..., n * block_bytes] -> [..., n, block_bytes]."""
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)


def half(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian float16 at bytes [offset, offset+2) of every block, as float32 [..., n, 1]."""
    return b[..., offset:offset + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., q] -> [..., 2, q]: low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [..., q] -> [..., count, q]: bit i of every byte in row i (i < count <= 8)."""
    shifts = torch.arange(count, dtype=torch.uint8).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & 1


def viewed(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes [..., n * itemsize] read as n values of `dtype` (copied when not aligned for a view)."""
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.contiguous().view(dtype)
