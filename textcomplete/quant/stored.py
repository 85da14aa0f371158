"""Weights kept as a file stores them: a view of a GGUF file's bytes, in one block format, never expanded.

A `StoredTensor` is a matrix (or a stack of matrices) whose rows are runs of whole blocks. The loader's
name and layout conversions only ever regroup whole rows (llama.cpp's q/k row order, a stack of experts
split per expert), so they act on the bytes without decoding them; row reorders are recorded, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from textcomplete.quant import Format, dequantize, row_bytes


@dataclass(frozen=True)
class StoredTensor:
    raw: torch.Tensor                  # uint8 [*rows, row_bytes], a read-only view of the mapped file
    fmt: Format
    shape: tuple[int, ...]             # the logical PyTorch shape: (*rows, k)
    row_order: torch.Tensor | None = None   # long [rows]: logical row i is stored row row_order[i] (2-D only)

    @classmethod
    def of(cls, raw: torch.Tensor, fmt: Format, shape: tuple[int, ...]) -> StoredTensor:
        k = shape[-1]
        if k % fmt.block_size or raw.shape[-1] != row_bytes(fmt, k) or tuple(raw.shape[:-1]) != shape[:-1]:
            raise ValueError(f"{fmt.name} bytes {tuple(raw.shape)} do not hold a {shape} tensor")
        return cls(raw, fmt, tuple(shape))

    @property
    def k(self) -> int:
        return self.shape[-1]

    def dim(self) -> int:
        return len(self.shape)

    def reorder_rows(self, order: torch.Tensor) -> StoredTensor:
        """The matrix whose row i is this one's row order[i] (recorded: the bytes stay where they are)."""
        if self.dim() != 2:
            raise ValueError("only a matrix's rows can be reordered")
        combined = order if self.row_order is None else self.row_order[order]
        return replace(self, row_order=combined)

    def __getitem__(self, index: int) -> StoredTensor:
        """One matrix of a stack ([experts, rows, k] -> [rows, k])."""
        if self.dim() < 3 or not isinstance(index, int):
            raise TypeError("a stored tensor is indexed only by an int, over a stack of matrices")
        return StoredTensor(self.raw[index], self.fmt, self.shape[1:])

    def chunk(self, chunks: int, dim: int) -> tuple[StoredTensor, ...]:
        """Split along a row dimension (never along k, which would cut blocks)."""
        dim = dim % self.dim()
        if dim == self.dim() - 1 or self.row_order is not None:
            raise ValueError("a stored tensor splits only along its rows, before any reorder")
        parts = self.raw.chunk(chunks, dim=dim)
        return tuple(StoredTensor(p, self.fmt, (*p.shape[:-1], self.k)) for p in parts)

    def reshape(self, *shape: int) -> StoredTensor:
        """Regroup rows ([1, k] <-> [k] is not allowed: 1-D tensors are never stored this way)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if shape[-1] not in (self.k, -1) or self.row_order is not None:
            raise ValueError(f"a stored {self.shape} tensor cannot become {shape}")
        raw = self.raw.reshape(*shape[:-1], self.raw.shape[-1])
        return StoredTensor(raw, self.fmt, (*raw.shape[:-1], self.k))

    def dequantize(self) -> torch.Tensor:
        """A float32 copy (for the few places that need plain values: small tensors, unsupported layers)."""
        values = dequantize(self.raw.reshape(-1, self.raw.shape[-1]), self.fmt, self.k).reshape(self.shape)
        return values if self.row_order is None else values[self.row_order]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


@dataclass(frozen=True)
class StoredStack:
    """A stack of stored matrices that are not one run of bytes: expert e's matrix is the rows of
    `experts[e]`'s parts one after another (a fused gate/up projection whose halves are two GGUF tensors)."""
    experts: tuple[tuple[StoredTensor, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.experts[0]
        return (len(self.experts), sum(p.shape[0] for p in first), first[0].k)

    def dequantize(self) -> torch.Tensor:
        """A float32 copy [experts, rows, k]."""
        return torch.stack([torch.cat([p.dequantize() for p in parts]) for parts in self.experts])
