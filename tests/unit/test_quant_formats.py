"""GGUF block formats: every PyTorch decoder equals the reference `gguf.quants.dequantize` bit for bit.

Blocks are random but valid: quantized by `gguf` where it can (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16), and
for the K-quants random codes with random finite float16 scales.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from textcomplete.quant import FORMATS, Format, dequantize, format_of, row_bytes

EXPECTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the float16 scales in a K-quant block (the rest is codes and packed sub-block scales).
_K_QUANT_HALVES = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,)}


def random_blocks(fmt: Format, rows: int, k: int, seed: int) -> np.ndarray:
    """Valid uint8 [rows, row_bytes] weights of `fmt` with varied scales."""
    rng = np.random.default_rng(seed)
    qtype = QType(fmt.type_id)
    if qtype not in _K_QUANT_HALVES:
        w = (rng.standard_normal((rows, k)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
        data = w if qtype == QType.F32 else gguf.quants.quantize(w, qtype)
        return np.ascontiguousarray(data).view(np.uint8).reshape(rows, row_bytes(fmt, k))
    blocks = rng.integers(0, 256, size=(rows * k // fmt.block_size, fmt.block_bytes), dtype=np.uint8)
    for offset in _K_QUANT_HALVES[qtype]:
        scale = (rng.uniform(1e-3, 0.1, len(blocks)) * rng.choice([-1, 1], len(blocks))).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, row_bytes(fmt, k))


def reference(raw: np.ndarray, fmt: Format) -> np.ndarray:
    qtype = QType(fmt.type_id)
    if qtype == QType.BF16:   # gguf decodes BF16 through its quant table: the high half of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf.quants.dequantize(raw, qtype)


def by_name(name: str) -> Format:
    return next(f for f in FORMATS.values() if f.name == name)


def test_the_registry_holds_every_format_with_ggml_geometry():
    assert sorted(f.name for f in FORMATS.values()) == sorted(EXPECTED)
    for type_id, fmt in FORMATS.items():
        assert type_id == fmt.type_id == int(QType[fmt.name])
        assert (fmt.block_size, fmt.block_bytes) == gguf.GGML_QUANT_SIZES[QType(type_id)]
        assert format_of(type_id) is fmt


@pytest.mark.parametrize("name", EXPECTED)
@pytest.mark.parametrize("blocks_per_row", [1, 3, 7])
def test_dequantize_equals_the_reference(name, blocks_per_row):
    fmt = by_name(name)
    k = (16 if fmt.block_size == 1 else fmt.block_size) * blocks_per_row + (5 if fmt.block_size == 1 else 0)
    raw = random_blocks(fmt, 9, k, seed=blocks_per_row)
    got = dequantize(torch.from_numpy(raw), fmt, k)
    assert got.dtype == torch.float32 and got.shape == (9, k)
    np.testing.assert_array_equal(got.numpy(), reference(raw, fmt).reshape(9, k))


@pytest.mark.parametrize("name", EXPECTED)
def test_format_decoders_take_any_leading_shape(name):
    fmt = by_name(name)
    k = 32 if fmt.block_size == 1 else fmt.block_size * 2
    raw = torch.from_numpy(random_blocks(fmt, 6, k, seed=1))
    flat = fmt.dequantize(raw)
    assert flat.shape == (6, k)
    torch.testing.assert_close(fmt.dequantize(raw.reshape(2, 3, -1)), flat.reshape(2, 3, k), rtol=0, atol=0)
    torch.testing.assert_close(fmt.dequantize(raw.reshape(-1)), flat.reshape(-1), rtol=0, atol=0)


def test_format_of_an_unsupported_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError, match=r"Q2_K.*supported types: .*Q4_K"):
        format_of(int(QType.Q2_K))
    with pytest.raises(ValueError, match="9999"):
        format_of(9999)


def test_row_bytes_and_shape_checks():
    q4k = by_name("Q4_K")
    assert row_bytes(q4k, 512) == 288 and row_bytes(by_name("F16"), 7) == 14
    with pytest.raises(ValueError, match="multiple of 256"):
        row_bytes(q4k, 300)
    with pytest.raises(ValueError, match=r"uint8 \[N, 288\]"):
        dequantize(torch.zeros(2, 144, dtype=torch.uint8), q4k, 512)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 288, dtype=torch.int8), q4k, 512)
