"""Qwen2-MoE (Qwen1.5-MoE): the Qwen2 layout with sparse expert blocks plus a sigmoid-gated shared expert.

Layers in `mlp_only_layers`, or skipped by `decoder_sparse_step`, keep a dense MLP. Parameter names follow
transformers 5 (`mlp.gate`, `mlp.experts.gate_up_proj`, `mlp.shared_expert`, `mlp.shared_expert_gate`);
hub checkpoints' per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj` are stacked on loading.
"""

from __future__ import annotations

import torch
from torch import nn

from textcomplete.models import gguf_file, moe
from textcomplete.models.llama import GGUF_NAMES, LlamaMLP
from textcomplete.models.qwen2 import Qwen2ForCausalLM


def qwen_moe_mlp(cfg: dict, index: int, shared: bool) -> nn.Module:
    """Layer `index`'s MLP in the Qwen-MoE families: sparse (with the shared expert if `shared`), or dense."""
    hidden = cfg["hidden_size"]
    if not moe.is_sparse_layer(cfg, index):
        return LlamaMLP(hidden, cfg["intermediate_size"], bias=False)
    return moe.SparseMoeBlock(hidden, cfg["moe_intermediate_size"], moe.num_experts(cfg), cfg["num_experts_per_tok"],
                              bool(cfg.get("norm_topk_prob", False)),
                              cfg.get("shared_expert_intermediate_size", 0) if shared else 0)


def qwen_moe_gguf_config(gguf: gguf_file.GGUFFile, cfg: dict) -> dict:
    """`cfg` (llama-style, from the file) with the MoE settings llama.cpp reads for qwen2moe/qwen3moe."""
    counts = moe.expert_counts(gguf)
    dense = cfg["intermediate_size"]
    # llama.cpp makes every layer sparse (its converter cannot write a dense one for these architectures)
    cfg.update(counts, mlp_only_layers=[], decoder_sparse_step=1, moe_intermediate_size=gguf.size(
        "expert_feed_forward_length", dense // counts["num_experts_per_tok"] or None))   # llama.cpp's fallback
    return cfg


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    gguf_names = {**GGUF_NAMES, **moe.GGUF_MOE_NAMES}

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.stacker = moe.ExpertStacker(moe.num_experts(cfg))

    @staticmethod
    def biases(cfg: dict) -> tuple[bool, bool]:
        return bool(cfg.get("qkv_bias", True)), False

    def make_mlp(self, cfg: dict, index: int) -> nn.Module:
        return qwen_moe_mlp(cfg, index, shared=True)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return self.stacker.take(super().checkpoint_tensor(name, tensor))

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = qwen_moe_gguf_config(gguf, super().config_from_gguf(gguf))
        cfg.update(shared_expert_intermediate_size=gguf.size("expert_shared_feed_forward_length",
                                                             cfg["intermediate_size"]),
                   qkv_bias=gguf.has_tensor("blk.0.attn_q.bias"),
                   norm_topk_prob=False)   # llama.cpp's qwen2moe graph never renormalises the top-k weights
        return cfg

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        experts = moe.moe_tensors_from_gguf(name, tensor)
        return experts if experts is not None else super().tensors_from_gguf(name, tensor, cfg)
