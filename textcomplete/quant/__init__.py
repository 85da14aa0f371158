"""Weight formats as GGUF stores them: the registry of block formats and the products that read them in place.

A weight matrix stays raw bytes (often a read-only memory map): uint8 [N, row_bytes], each row a run of
whole blocks. `matmul` multiplies float32 activations by it with the native kernels of
textcomplete/kernels/quant_matmul.cpp when they are built, else with PyTorch on decoded row chunks; both
equal x @ dequantize(raw).T up to float32 rounding. One module per format lives in `formats/`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from textcomplete.kernels import DIRECT_ROWS
from textcomplete.quant import formats as _formats

# The PyTorch path decodes this many float32 values of the weight at a time (bounds its scratch memory).
_FALLBACK_CHUNK_VALUES = 1 << 21


@dataclass(frozen=True)
class Format:
    """One GGML type we run: its block geometry and its PyTorch decoder."""
    name: str            # "Q4_K", ...
    type_id: int         # GGMLQuantizationType value
    block_size: int      # values per block
    block_bytes: int
    dequantize: Callable[[torch.Tensor], torch.Tensor]   # uint8 [..., nb*block_bytes] -> float32 [..., nb*block_size]


def _discover() -> dict[int, Format]:
    found = {}
    for info in pkgutil.iter_modules(_formats.__path__):
        module = importlib.import_module(f"{_formats.__name__}.{info.name}")
        fmt = Format(module.TYPE.name, int(module.TYPE), module.BLOCK_SIZE, module.BLOCK_BYTES, module.dequantize)
        found[fmt.type_id] = fmt
    return dict(sorted(found.items()))


FORMATS: dict[int, Format] = _discover()


def format_of(type_id: int) -> Format:
    """The format of GGML type `type_id`; ValueError naming it and the supported ones otherwise."""
    fmt = FORMATS.get(int(type_id))
    if fmt is None:
        from gguf import GGMLQuantizationType
        try:
            name = GGMLQuantizationType(int(type_id)).name
        except ValueError:
            name = "unknown"
        supported = ", ".join(f.name for f in FORMATS.values())
        raise ValueError(f"GGML type {type_id} ({name}) is not supported; supported types: {supported}")
    return fmt


def row_bytes(fmt: Format, k: int) -> int:
    """Bytes of one weight row of k values (k a multiple of the block size)."""
    if k <= 0 or k % fmt.block_size:
        raise ValueError(f"a {fmt.name} row holds a positive multiple of {fmt.block_size} values, not {k}")
    return k // fmt.block_size * fmt.block_bytes


def dequantize(raw: torch.Tensor, fmt: Format, k: int) -> torch.Tensor:
    """uint8 [N, row_bytes] -> float32 [N, K], with PyTorch operators (the portable path and the oracle)."""
    _check_raw(raw, fmt, k)
    return fmt.dequantize(raw).reshape(raw.shape[0], k)


def matmul(x: torch.Tensor, raw: torch.Tensor, fmt: Format, k: int, native: bool = True,
           int8: bool = False) -> torch.Tensor:
    """float32 [M, N] = x @ dequantize(raw).T for x float32 [M, K] contiguous and raw uint8 [N, row_bytes]
    (read, never written). The native kernel when it is built and `native`, else PyTorch. With `int8`, products
    quantize x to 8 bits in blocks of 32 (where the format and CPU allow: `int8_supported`; products of at most
    DIRECT_ROWS rows only on the formats with an in-register kernel: Q4_K, Q5_K and Q6_K, and with AVX2 every
    integer format), which is faster and not exact."""
    _check_x(x, k)
    _check_raw(raw, fmt, k)
    module = _native(fmt) if native else None
    if module is not None:
        return module.matmul(x, raw, fmt.type_id, k, DIRECT_ROWS, False, int8)
    out = x.new_empty(x.shape[0], raw.shape[0])
    step = max(1, _FALLBACK_CHUNK_VALUES // k)
    for n in range(0, raw.shape[0], step):
        torch.mm(x, fmt.dequantize(raw[n:n + step]).reshape(-1, k).t(), out=out[:, n:n + step])
    return out


def matmul_parts(x: torch.Tensor, parts: list[tuple[torch.Tensor, Format]], k: int,
                 int8: bool = False) -> torch.Tensor:
    """float32 [M, sum of N_i] = x @ [dequantize(raw_0); dequantize(raw_1); ...].T for `parts` (raw_i, fmt_i),
    as `matmul` takes each: one native call that writes each product into its own columns (no concatenation
    afterwards), or the products concatenated where a format has no native kernel. `int8` applies to the parts
    whose format allows it."""
    _check_x(x, k)
    for raw, fmt in parts:
        _check_raw(raw, fmt, k)
    modules = [_native(fmt) for _, fmt in parts]
    if all(module is not None for module in modules):
        return modules[0].matmul_parts(x, [raw for raw, _ in parts], [fmt.type_id for _, fmt in parts], k,
                                       DIRECT_ROWS, False, int8)
    return torch.cat([matmul(x, raw, fmt, k, int8=int8) for raw, fmt in parts], dim=1)


def embedding(ids: torch.Tensor, raw: torch.Tensor, fmt: Format, k: int) -> torch.Tensor:
    """Rows `ids` of the decoded matrix: float32 [len(ids), K]."""
    _check_raw(raw, fmt, k)
    rows = raw.index_select(0, ids.reshape(-1).long())
    module = _native(fmt)
    if module is not None:
        return module.dequantize(rows, fmt.type_id, k, False)
    return fmt.dequantize(rows).reshape(rows.shape[0], k)


# Formats whose blocks give integer codes for the 8-bit-activation products (kernels/quant/<name>.h: codes()).
INT8_FORMATS = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})


def int8_supported(fmt: Format) -> bool:
    """Whether products with `fmt` weights can quantize activations to 8 bits here (native kernels built
    with AVX-512 VNNI or AVX2)."""
    module = _native(fmt)
    return module is not None and fmt.name in INT8_FORMATS and module.int8_available()


def has_native_kernel(fmt: Format) -> bool:
    """Whether the native kernels are built and run `fmt` (building them on first call)."""
    return _native(fmt) is not None


def native_available() -> bool:
    """Whether the native kernels are built (building them on first call)."""
    from textcomplete.kernels import quant_matmul
    return quant_matmul() is not None


def _native(fmt: Format) -> ModuleType | None:
    """The native module if it is built and has a kernel for `fmt`."""
    from textcomplete.kernels import quant_matmul
    module = quant_matmul()
    return module if module is not None and fmt.type_id in _native_types(module) else None


@functools.cache
def _native_types(module: ModuleType) -> frozenset[int]:
    return frozenset(module.type_ids())


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"activations must be float32 [M, {k}], not {x.dtype} {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"activations must be contiguous (strides {x.stride()} for shape {tuple(x.shape)})")


def _check_raw(raw: torch.Tensor, fmt: Format, k: int) -> None:
    expected = row_bytes(fmt, k)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != expected:
        raise ValueError(f"{fmt.name} weights of {k} values a row must be uint8 [N, {expected}], "
                         f"not {raw.dtype} {tuple(raw.shape)}")
    if raw.stride(1) != 1:
        raise ValueError(f"{fmt.name} weight rows must be contiguous bytes (strides {raw.stride()})")
