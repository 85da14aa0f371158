"""Qwen3: the Llama layout with RMSNorm over each head's queries and keys before the rotary embedding.

Parameter names follow Hugging Face's `Qwen3ForCausalLM` (`self_attn.q_norm`, `self_attn.k_norm`).
"""

from __future__ import annotations

from textcomplete.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    gguf_permuted_qk = False
