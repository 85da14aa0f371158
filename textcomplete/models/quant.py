"""Weight-only quantized linear layers (int8 per output channel, int4 in groups of 32) for faster decoding.

Decoding reads every weight once per step, so smaller weights mean faster steps on a memory-bound CPU.
The kernels are torch's own (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); they take bfloat16
activations, so inputs are rounded to bfloat16 for the matmul and outputs widened back. float32 weights
("none") stay the exact mode.

Those kernels pay off only for few rows (decode steps); for many rows (prefill, scoring) float32 matmuls
are faster on the CPU, so each layer keeps its float32 weight too and uses it above `FLOAT_ROWS` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32
_INNER_K_TILES = 8
_ACT = torch.bfloat16
FLOAT_ROWS = 32   # steps with more tokens than this run the float32 weights (compute-bound, exact)


class _WeightOnly(nn.Module):
    """Shared by both widths: the float32 weight for wide steps, the quantized kernel for narrow ones."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        # In the model's own dtype, as the activations that meet them (float32 in the exact mode).
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2     # the models' activations are [num_tokens, features]: no reshapes needed
        rows = x if flat else x.reshape(-1, x.shape[-1])
        if rows.shape[0] > FLOAT_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = self.quantized_matmul(rows.to(_ACT)).to(x.dtype)
        if not flat:
            y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized weight, scales) as `quantized_matmul` passes them to its kernel."""
        raise NotImplementedError


class Int8Linear(_WeightOnly):
    """y = x @ (q * scale).T: int8 weights with one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = self.weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(_ACT))

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scale)

    def kernel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scale


class Int4Linear(_WeightOnly):
    """Asymmetric 4-bit weights in groups of 32 along the input: w = (q - 8) * scale + zero."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = self.weight.float()
        n, k = w.shape
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = (high - low).clamp(min=1e-12) / 15.0
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES))
        zero = low + 8.0 * scale
        # [k / group, n, 2], the layout the kernel reads
        self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(_ACT))

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales_zeros)

    def kernel_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed, self.scales_zeros


def _quantized(linear: nn.Linear, kind: str) -> nn.Module:
    if kind == "int4" and linear.in_features % INT4_GROUP == 0:
        return Int4Linear(linear)
    return Int8Linear(linear)   # int8, and int4 layers whose width is not a multiple of the group


def quantize_linears(model: nn.Module, kind: str) -> int:
    """Replace every nn.Linear of `model` in place; returns how many were replaced."""
    if kind not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    if kind == "none":
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _quantized(child, kind))
                count += 1
    return count
