"""The Llama family served without torch: a GGUF file's weights as it stores them, run by the native library.

Every step's decoder layers are one call into the library's layer stack (textcomplete/kernels/llama_step.h,
the same code the torch extension runs decode steps with); the embedding lookup, the final norm and the
output projection are library calls too, and everything around them is numpy. Nothing here imports torch,
so a server of such a file is its weights, its KV cache and a small runtime.

The families: Llama (and Mistral, SmolLM), Qwen2 (q/k/v biases) and Qwen3 (q/k norms), dense, every matrix in
a format the kernels run. `unsupported_reason` says why a file is not one (the engine then loads it with torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from textcomplete.errors import ModelFileError
from textcomplete.kernels.library import CACHE_TYPES, LlamaLayers, LlamaShape, Matrix, NativeLibrary, PromptChunk, \
    Stored
from textcomplete.models.gguf_file import GGUFFile, qk_row_order
from textcomplete.models.llama_config import context_length, llama_gguf_config, rope_settings, sliding_windows
from textcomplete.models.mapping import zeroed_pages
from textcomplete.models.rope import RopeFrequencies
from textcomplete.models.spec import ModelSpec
from textcomplete.tokenizer import Tokenizer


@dataclass(frozen=True)
class Family:
    permuted_qk: bool   # llama.cpp's converter interleaves the rotary halves of q/k rows
    qkv_bias: bool
    qk_norm: bool


FAMILIES = {"llama": Family(True, False, False), "mistral": Family(True, False, False),
            "qwen2": Family(False, True, False), "qwen3": Family(False, False, True)}
_PROJECTIONS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def unsupported_reason(gguf: GGUFFile, library: NativeLibrary) -> str | None:
    """Why the native layers cannot run this file (None: they can)."""
    if gguf.arch not in FAMILIES:
        return f"architecture {gguf.arch!r} (natively: {', '.join(FAMILIES)})"
    if gguf.get("expert_count"):
        return "a mixture of experts"
    cfg = llama_gguf_config(gguf)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        return "a partial rotary embedding"
    for t in gguf.tensor_infos:
        if len(t.shape) >= 2 and not library.has_type(int(t.type)):
            return f"tensor {t.name!r} is {t.type.name}, which has no native kernel"
    return None


class NativeLlama:
    """A Llama-family GGUF file's model: its spec and tokenizer once loaded, then (after `allocate`) steps."""

    def __init__(self, gguf: GGUFFile, library: NativeLibrary) -> None:
        """`gguf`: a file that unsupported_reason accepts."""
        self.path, self.library, self.gguf = gguf.path, library, gguf
        self.family = FAMILIES[gguf.arch]
        self.config = cfg = llama_gguf_config(gguf)
        heads = cfg["num_attention_heads"]
        self.spec = ModelSpec(num_layers=cfg["num_hidden_layers"], num_heads=heads,
                              num_kv_heads=cfg["num_key_value_heads"],
                              head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                              vocab_size=cfg["vocab_size"], max_position_embeddings=context_length(cfg))
        self.hidden_size, self.eps = cfg["hidden_size"], float(cfg["rms_norm_eps"])
        try:
            self.tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        except ValueError as exc:
            raise ModelFileError(gguf.path, f"its tokenizer cannot be built: {exc}") from None
        gguf.drop_vocabulary()
        theta, scaling = rope_settings(cfg)
        self.rope = RopeFrequencies(self.spec.head_dim, self.spec.max_position_embeddings, theta, scaling)
        self.windows = [w or 0 for w in sliding_windows(cfg)]
        self.embedding = self._stored("token_embd.weight")
        self.output = self._stored("output.weight") if gguf.has_tensor("output.weight") else self.embedding
        self.final_norm = gguf.read_array("output_norm.weight")
        self.layers: LlamaLayers | None = None
        self.int8 = False   # products quantize activations to 8 bits where the format allows

    def _stored(self, name: str) -> Stored:
        t = self.gguf.tensor_info(name)
        return Stored.of(self.gguf.raw_rows(name), int(t.type))

    def set_context_length(self, length: int) -> None:
        """The engine serves contexts of up to `length` tokens (some rope scalings choose by it)."""
        self.rope.set_context_length(length)

    def allocate(self, num_blocks: int, block_size: int, cache_dtype: str, direct_rows: int,
                 int8: bool = False) -> None:
        """Build the layer stack over KV caches of num_blocks blocks of block_size tokens in `cache_dtype` (a key
        of CACHE_TYPES). The caches are zero pages until steps write them."""
        s, cfg = self.spec, self.config
        shape = LlamaShape(hidden=self.hidden_size, heads=s.num_heads, kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                           rotary_dim=s.head_dim, eps=self.eps, block_size=block_size,
                           num_slots=num_blocks * block_size, cache_dtype=cache_dtype, direct_rows=direct_rows,
                           int8=int8)
        layers = self.library.llama_layers(shape)
        self.int8 = int8
        dtype = CACHE_TYPES[cache_dtype][1]
        slot_values = 2 * s.num_kv_heads * s.head_dim
        for i in range(s.num_layers):
            prefix = f"blk.{i}."
            projections = [[self._matrix(prefix + name, cfg) for name in names] for names in _PROJECTIONS]
            q_norm = k_norm = None
            if self.family.qk_norm:
                q_norm, k_norm = (self.gguf.read_array(prefix + n + ".weight") for n in ("attn_q_norm", "attn_k_norm"))
            cache = zeroed_pages(num_blocks * block_size * slot_values * np.dtype(dtype).itemsize).view(dtype)
            layers.add_layer(self.gguf.read_array(prefix + "attn_norm.weight"),
                             self.gguf.read_array(prefix + "ffn_norm.weight"), q_norm, k_norm,
                             cache.reshape(num_blocks * block_size, 2, s.num_kv_heads, s.head_dim), self.windows[i],
                             projections)
        self.layers = layers

    def _matrix(self, name: str, cfg: dict) -> Matrix:
        """A projection's matrix, q/k rows put back in Hugging Face's order where the converter interleaved them,
        with its bias where the family has one."""
        weight = self._stored(name + ".weight")
        order = None
        part = name.rsplit(".", 1)[-1]
        if self.family.permuted_qk and part in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if part == "attn_q" else cfg["num_key_value_heads"]
            order = qk_row_order(weight.rows, heads)
        bias = None
        if self.family.qkv_bias and part in ("attn_q", "attn_k", "attn_v"):
            bias = self.gguf.read_array(name + ".bias")
            bias = bias if order is None else bias[order]
        return Matrix(weight, order, bias)

    def hidden_states(self, token_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
                      key_slots: np.ndarray, key_lens: np.ndarray, chunks: list[PromptChunk]) -> np.ndarray:
        """One step (decode rows first, then prompt chunks; see LlamaLayers.step): the last layer's hidden
        states [n, hidden], before the final norm."""
        x = self.library.embed(self.embedding, token_ids, self.hidden_size)
        cos, sin = self.rope.cos_sin(positions)
        return self.layers.step(x, cos, sin, slot_mapping, key_slots, key_lens, chunks)

    def logits(self, hidden: np.ndarray, direct_rows: int) -> np.ndarray:
        """float32 logits [n, vocab] of hidden states [n, hidden]."""
        normed = self.library.rms_norm(hidden, self.final_norm, self.eps)
        return self.library.matmul(normed, [self.output], direct_rows, int8=self.int8)
