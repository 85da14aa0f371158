"""The shape facts of a loaded model that the engine needs (cache layout, vocabulary, context).

Every architecture fills one in from its configuration; nothing else of the model leaks out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
