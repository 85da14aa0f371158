"""OLMoE: the Llama layout with RMSNorm over the whole query and key projections (all heads together, unlike
Qwen3's per-head norm), optionally clipped q/k/v, and every MLP a sparse block of experts.

Parameter names follow transformers 5's `OlmoeForCausalLM`; hub checkpoints' per-expert tensors are stacked.
"""

from __future__ import annotations

import torch
from torch import nn

from textcomplete.models import gguf_file, moe
from textcomplete.models.layers import AttentionMetadata, RMSNorm, RotaryEmbedding
from textcomplete.models.llama import GGUF_NAMES, LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from textcomplete.models.spec import ModelSpec


class OlmoeAttention(LlamaAttention):
    def __init__(self, spec: ModelSpec, cfg: dict, sliding_window: int | None = None) -> None:
        bias = bool(cfg.get("attention_bias", False))
        super().__init__(spec, cfg, (bias, bias), qk_norm=False, sliding_window=sliding_window)
        eps = cfg["rms_norm_eps"]
        self.q_norm = RMSNorm(self.num_heads * self.head_dim, eps)
        self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, eps)
        self.clip = cfg.get("clip_qkv")

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)             # [t, q_size], [t, kv_size]: one norm across heads
        if self.clip is not None:                         # transformers clips after the norms
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        qk = torch.cat((q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d)), dim=1)
        q, k = RotaryEmbedding.apply(qk, *cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        out = self.attn(q, k, v.reshape(t, self.num_kv_heads, d), meta)
        return self.o_proj(out.reshape(t, -1))


class OlmoeForCausalLM(LlamaForCausalLM):
    gguf_names = {**GGUF_NAMES, **moe.GGUF_MOE_NAMES}
    gguf_permuted_qk = False   # llama.cpp runs OLMoE with NeoX-style rotary: the converter leaves q/k rows

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.stacker = moe.ExpertStacker(moe.num_experts(cfg))

    def make_layer(self, cfg: dict, index: int, sliding_window: int | None) -> nn.Module:
        return LlamaDecoderLayer(cfg, OlmoeAttention(self.spec, cfg, sliding_window), self.make_mlp(cfg, index))

    def make_mlp(self, cfg: dict, index: int) -> nn.Module:
        # OLMoE's experts are `intermediate_size` wide; it has no dense layers
        return moe.SparseMoeBlock(cfg["hidden_size"], cfg["intermediate_size"], moe.num_experts(cfg),
                                  cfg["num_experts_per_tok"], bool(cfg.get("norm_topk_prob", False)))

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return self.stacker.take(super().checkpoint_tensor(name, tensor))

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = super().config_from_gguf(gguf)
        # llama.cpp's olmoe graph never renormalises the top-k weights and never clips q/k/v (its converter
        # writes no clamp for OLMoE), so neither is set here.
        cfg.update(moe.expert_counts(gguf), norm_topk_prob=False, clip_qkv=None,
                   attention_bias=gguf.has_tensor("blk.0.attn_q.bias"))
        return cfg

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        experts = moe.moe_tensors_from_gguf(name, tensor)
        return experts if experts is not None else super().tensors_from_gguf(name, tensor, cfg)
