"""Qwen2 and Qwen2.5: the Llama layout with biased q/k/v projections (the output projection has none).

Parameter names follow Hugging Face's `Qwen2ForCausalLM`.
"""

from __future__ import annotations

from textcomplete.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    gguf_permuted_qk = False

    @staticmethod
    def biases(cfg: dict) -> tuple[bool, bool]:
        return True, False
