"""GPT-2: learned absolute positions, LayerNorm, fused q/k/v projection and a GELU MLP.

Parameter names follow Hugging Face's `GPT2LMHeadModel`; its Conv1D weights ([in, out]) are
transposed into ordinary linear layers ([out, in]) as they load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textcomplete.models import gguf_file
from textcomplete.models.layers import AttentionMetadata, PagedAttention
from textcomplete.models.spec import ModelSpec

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GGUF_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class GPT2Attention(nn.Module):
    def __init__(self, spec: ModelSpec, hidden: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)
        self.attn = PagedAttention(spec.num_heads, spec.num_heads, spec.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.c_attn(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(q, k, v, meta).reshape(t, -1))


class GPT2MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GPT-2 activation {activation!r} is not supported ({', '.join(_ACTIVATIONS)})")
        self.c_fc = nn.Linear(hidden, inner)
        self.c_proj = nn.Linear(inner, hidden)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, spec: ModelSpec, cfg: dict) -> None:
        super().__init__()
        hidden, eps = cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(spec, hidden)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hidden, cfg.get("n_inner") or 4 * hidden, cfg.get("activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, spec: ModelSpec, cfg: dict) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wpe = nn.Embedding(spec.max_position_embeddings, cfg["n_embd"])
        self.h = nn.ModuleList(GPT2Block(spec, cfg) for _ in range(spec.num_layers))
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg.get("layer_norm_epsilon", 1e-5))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with per-layer attention scaling are not supported")
        self.spec = self.spec_from_config(cfg)
        self.transformer = GPT2Transformer(self.spec, cfg)
        self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)

    @classmethod
    def spec_from_config(cls, cfg: dict) -> ModelSpec:
        heads = cfg["n_head"]
        return ModelSpec(num_layers=cfg["n_layer"], num_heads=heads, num_kv_heads=heads,
                         head_dim=cfg["n_embd"] // heads, vocab_size=cfg["vocab_size"],
                         max_position_embeddings=cfg.get("n_positions", 1024))

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"}

    def fuse(self) -> None:
        """Nothing to merge: GPT-2 checkpoints already hold q/k/v as one projection."""

    @staticmethod
    def checkpoint_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Map one checkpoint tensor to this module's naming and layout; None to skip it."""
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None            # causal-mask buffers of old checkpoints
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        return name, tensor

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        return {"architectures": ["GPT2LMHeadModel"], "n_embd": gguf.size("embedding_length"),
                "n_head": gguf.size("attention.head_count"), "n_layer": gguf.size("block_count"),
                "n_positions": gguf.size("context_length"),
                "vocab_size": gguf.size("vocab_size", len(gguf.metadata["tokenizer.ggml.tokens"])),
                "layer_norm_epsilon": gguf.get("attention.layer_norm_epsilon", 1e-5),
                "n_inner": gguf.size("feed_forward_length") if gguf.get("feed_forward_length") else None,
                "activation_function": "gelu_new"}

    @staticmethod
    def keeps_stored(gguf_name: str) -> bool:
        return False   # its GGUF matrices are transposed on loading, which needs their values

    @staticmethod
    def keeps_stored_checkpoint(name: str) -> bool:
        return False   # as in GGUF files, its Conv1D matrices are transposed on loading

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        hf = gguf_file.hf_name(name, GGUF_NAMES, layer_prefix="transformer.h")
        if hf is None:
            return None
        return [(hf, tensor.t() if hf.endswith(_CONV1D_SUFFIXES) else tensor)]   # HF's Conv1D layout [in, out]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, meta)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
