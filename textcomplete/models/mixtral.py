"""Mixtral: the Llama layout (sliding window optional) with every MLP a sparse block of SwiGLU experts.

Parameter names follow transformers 5 (`mlp.gate`, `mlp.experts.gate_up_proj`); hub checkpoints' per-expert
`block_sparse_moe.experts.{e}.w1/w2/w3` are renamed and stacked on loading. llama.cpp files Mixtral under
the "llama" GGUF architecture, with experts.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from textcomplete.models import gguf_file, moe
from textcomplete.models.llama import GGUF_NAMES, LlamaForCausalLM

_EXPERT_WEIGHTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_PIECE = re.compile(r"(\.experts\.\d+)\.(w[123])\.")


class MixtralForCausalLM(LlamaForCausalLM):
    gguf_names = {**GGUF_NAMES, **moe.GGUF_MOE_NAMES}

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.stacker = moe.ExpertStacker(moe.num_experts(cfg))

    def make_mlp(self, cfg: dict, index: int) -> nn.Module:
        # transformers' Mixtral router always renormalises its top-k weights
        return moe.SparseMoeBlock(cfg["hidden_size"], cfg["intermediate_size"], moe.num_experts(cfg),
                                  cfg["num_experts_per_tok"], normalize=True)

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = _EXPERT_PIECE.sub(lambda m: f"{m[1]}.{_EXPERT_WEIGHTS[m[2]]}.", name)
        return self.stacker.take(super().checkpoint_tensor(name, tensor))

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = super().config_from_gguf(gguf)
        counts = moe.expert_counts(gguf)
        cfg.update(num_local_experts=counts["num_experts"], num_experts_per_tok=counts["num_experts_per_tok"])
        return cfg

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        experts = moe.moe_tensors_from_gguf(name, tensor)
        return experts if experts is not None else super().tensors_from_gguf(name, tensor, cfg)
