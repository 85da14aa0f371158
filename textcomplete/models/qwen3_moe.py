"""Qwen3-MoE: the Qwen3 layout (RMSNorm over each head's queries and keys) with sparse expert blocks.

There is no shared expert; `mlp_only_layers` and `decoder_sparse_step` choose dense layers as in Qwen2-MoE.
Parameter names follow transformers 5; hub checkpoints' per-expert tensors are stacked on loading.
"""

from __future__ import annotations

import torch
from torch import nn

from textcomplete.models import gguf_file, moe
from textcomplete.models.llama import GGUF_NAMES
from textcomplete.models.qwen2_moe import qwen_moe_gguf_config, qwen_moe_mlp
from textcomplete.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    gguf_names = {**GGUF_NAMES, **moe.GGUF_MOE_NAMES}

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.stacker = moe.ExpertStacker(moe.num_experts(cfg))

    def make_mlp(self, cfg: dict, index: int) -> nn.Module:
        return qwen_moe_mlp(cfg, index, shared=False)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return self.stacker.take(super().checkpoint_tensor(name, tensor))

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = qwen_moe_gguf_config(gguf, super().config_from_gguf(gguf))
        cfg.update(attention_bias=gguf.has_tensor("blk.0.attn_q.bias"),
                   norm_topk_prob=True)   # llama.cpp's qwen3moe graph always renormalises the top-k weights
        return cfg

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        experts = moe.moe_tensors_from_gguf(name, tensor)
        return experts if experts is not None else super().tensors_from_gguf(name, tensor, cfg)
