"""The Phi-3 family (Phi-3, Phi-3.5-mini, Phi-4-mini): Llama layers whose checkpoints fuse q/k/v and gate/up.

Parameter names follow Hugging Face's `Phi3ForCausalLM`; the GGUF form is what llama.cpp's converter writes
for `phi3` (fused tensors unpermuted, LongRoPE factors as two small tensors that become config values).
"""

from __future__ import annotations

import torch
from torch import nn

from textcomplete.models import gguf_file
from textcomplete.models.layers import rope_kind
from textcomplete.models.llama import GGUF_NAMES, LlamaForCausalLM, rope_settings

# llama.cpp's `attn_qkv` and `ffn_up` are Phi-3's fused projections, rows in the same order ([q; k; v], [gate; up]).
PHI3_GGUF_NAMES = {**{part: hf for part, hf in GGUF_NAMES.items()
                      if part not in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")},
                   "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_ROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
_PHI3_ORIGINAL_LENGTH = 4096   # Phi3Config's default original_max_position_embeddings


def phi3_config(cfg: dict) -> dict:
    """`cfg` with its rotary settings read the way transformers' `Phi3Config` reads them.

    Phi3Config renames the old scaling names "su" and "yarn" to "longrope", prefers its own top-level
    `original_max_position_embeddings` (4096 when absent) to the scaling's, and takes the rotary fraction
    from the scaling dict first.
    """
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Phi-3 with activation {cfg['hidden_act']!r} is not supported (only silu)")
    theta, scaling = rope_settings(cfg)
    params = scaling or cfg.get("rope_parameters") or {}
    out = {**cfg, "rope_theta": theta,
           "partial_rotary_factor": params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))}
    if scaling is not None:
        kind = "longrope" if rope_kind(scaling) in ("su", "yarn") else rope_kind(scaling)
        scaling = {**scaling, "rope_type": kind}
        if kind in ("longrope", "llama3"):
            scaling["original_max_position_embeddings"] = (cfg.get("original_max_position_embeddings")
                                                           or _PHI3_ORIGINAL_LENGTH)
    out["rope_scaling"] = scaling
    return out


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's decoder with partial rotary dims, LongRoPE and an optional sliding window over every layer.

    The layers are plain Llama ones built already fused, so the native decode layers serve them too.
    """

    gguf_names = PHI3_GGUF_NAMES
    gguf_permuted_qk = False   # the converter writes Phi-3's q/k rows as they are

    def __init__(self, cfg: dict) -> None:
        super().__init__(phi3_config(cfg))

    def make_layer(self, cfg: dict, index: int, sliding_window: int | None) -> nn.Module:
        """A Llama layer with `qkv_proj` and `gate_up_proj` from the start: the checkpoint's own tensors."""
        layer = super().make_layer(cfg, index, sliding_window)
        layer.self_attn.fuse()
        layer.mlp.fuse()
        return layer

    def fuse(self) -> None:
        """Nothing to merge after loading: the layers were built fused."""

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = gguf_file.llama_style_config(gguf)
        head_dim = cfg["head_dim"]
        rotary_dim = gguf.size("rope.dimension_count", head_dim)
        fraction = rotary_dim / head_dim
        if rotary_dim % 2 or rotary_dim > head_dim or int(head_dim * fraction) != rotary_dim:
            raise gguf.fail(f"phi3.rope.dimension_count {rotary_dim} does not fit heads of {head_dim} dims")
        cfg["partial_rotary_factor"] = fraction
        if gguf.has_tensor(_ROPE_FACTORS["long_factor"]):
            cfg["rope_scaling"] = _longrope_from_gguf(gguf, cfg)
            cfg["original_max_position_embeddings"] = cfg["rope_scaling"]["original_max_position_embeddings"]
        return cfg

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        if name in _ROPE_FACTORS.values():
            return []   # already in the config's rope scaling (config_from_gguf)
        return super().tensors_from_gguf(name, tensor, cfg)


def _longrope_from_gguf(gguf: gguf_file.GGUFFile, cfg: dict) -> dict:
    """The HF LongRoPE scaling of a phi3 GGUF file: its factor tensors, original length and attention factor."""
    scaling = {"rope_type": "longrope",
               "original_max_position_embeddings": gguf.size("rope.scaling.original_context_length",
                                                             cfg["max_position_embeddings"])}
    for key, tensor_name in _ROPE_FACTORS.items():
        if not gguf.has_tensor(tensor_name):
            raise gguf.fail(f"the file has {_ROPE_FACTORS['long_factor']!r} but no {tensor_name!r}")
        scaling[key] = gguf.read_tensor(tensor_name).flatten().tolist()
    attention = gguf.get("rope.scaling.attn_factor")
    if attention is not None:   # absent: computed from the lengths, as the converter would have
        scaling["attention_factor"] = float(attention)
    return scaling
