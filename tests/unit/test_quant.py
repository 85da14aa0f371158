"""Weight-only quantized linear layers: close to float32 for decode-sized inputs, exact for wide ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from textcomplete.models.quant import FLOAT_ROWS, Int4Linear, Int8Linear, quantize_linears


@pytest.mark.parametrize("cls,tolerance", [(Int8Linear, 0.03), (Int4Linear, 0.2)])
def test_quantized_linear_approximates_float(cls, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    q = cls(linear)
    x = torch.randn(4, 256)
    ref = linear(x)
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tolerance
    wide = torch.randn(FLOAT_ROWS + 1, 256)
    torch.testing.assert_close(q(wide), linear(wide))   # wide steps use the float32 weight


def test_quantize_linears_replaces_every_linear():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 64)))
    assert quantize_linears(model, "int4") == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with pytest.raises(ValueError):
        quantize_linears(model, "int3")
