"""Layers over stored weights: the one linear layer and the embedding that run any block format.

`StoredLinear` picks the kernel by its weight's format (textcomplete.quant.matmul): activations stay float32,
the weights are decoded in registers, so results equal a float32 matmul on the dequantized weights up to
rounding. Several projections a model fuses (q/k/v, gate/up) stay separate matrices in `ConcatLinear`: their
formats may differ (a Q4_K_M file keeps some of them in Q6_K) and concatenating would copy the file.
"""

from __future__ import annotations

import torch
from torch import nn

from textcomplete.quant import embedding, int8_supported, matmul, matmul_parts
from textcomplete.quant.stored import StoredTensor


class StoredLinear(nn.Module):
    """y = x @ W.T (+ b) for a stored W [out, in]."""

    def __init__(self, weight: StoredTensor, bias: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"a linear layer needs a matrix, not a {weight.shape} tensor")
        self.stored = weight
        self.int8 = False   # products quantize activations to 8 bits (use_int8_activations)
        self.in_features, self.out_features = weight.k, weight.shape[0]
        # The bias, if any, is an ordinary parameter: the checkpoint's value is assigned like any other.
        self.bias = nn.Parameter(torch.empty(self.out_features, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = matmul(rows, self.stored.raw, self.stored.fmt, self.in_features, int8=self.int8)   # [rows, out]
        return self.finish(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The product y [rows, out] (or a column range of a wider one) put in the checkpoint's row order and
        given the bias, in place."""
        if self.stored.row_order is not None:
            # index_select: advanced indexing runs a per-element kernel, four times slower on a prefill's rows.
            y.copy_(y.index_select(1, self.stored.row_order))
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.stored.fmt.name}"


def use_int8_activations(model: nn.Module) -> int:
    """Let every stored linear layer of `model` whose format has integer codes quantize the activations of
    products to 8 bits; returns how many do. Steps of few rows stay exact except on Q4_K, Q5_K and Q6_K weights,
    whose float32 decode is slower than the memory, and on every integer format with AVX2 (see
    textcomplete.quant.matmul)."""
    layers = [m for m in model.modules() if isinstance(m, StoredLinear) and int8_supported(m.stored.fmt)]
    for layer in layers:
        layer.int8 = True
    return len(layers)


class ConcatLinear(nn.Module):
    """Several linear layers side by side: their outputs concatenated in order."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not all(isinstance(p, StoredLinear) for p in self.parts):
            return torch.cat([p(x) for p in self.parts], dim=-1)
        # One product writing each part's columns of one output. use_int8_activations sets `int8` on every
        # part whose format allows it, and the product applies it to exactly those.
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = matmul_parts(rows, [(p.stored.raw, p.stored.fmt) for p in self.parts], self.in_features,
                         int8=any(p.int8 for p in self.parts))
        first = 0
        for p in self.parts:
            p.finish(y[:, first:first + p.out_features])
            first += p.out_features
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class StoredEmbedding(nn.Module):
    """Rows of a stored [vocab, dim] table, decoded on lookup."""

    def __init__(self, weight: StoredTensor) -> None:
        super().__init__()
        self.stored = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        if self.stored.row_order is not None:
            rows = self.stored.row_order[rows]
        out = embedding(rows, self.stored.raw, self.stored.fmt, self.embedding_dim)
        return out.reshape(*ids.shape, self.embedding_dim)
