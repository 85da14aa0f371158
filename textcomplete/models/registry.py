"""Which module implements which architecture: one registry, one file per architecture.

Keys are Hugging Face `architectures` names; GGUF `general.architecture` values map onto them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the CLI reads this module for --help without loading torch
    from torch import nn

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("textcomplete.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("textcomplete.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("textcomplete.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("textcomplete.models.qwen3", "Qwen3ForCausalLM"),
    "GPT2LMHeadModel": ("textcomplete.models.gpt2", "GPT2LMHeadModel"),
    "GemmaForCausalLM": ("textcomplete.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("textcomplete.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("textcomplete.models.gemma", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("textcomplete.models.gemma", "Gemma3ForCausalLM"),   # its text part
    "Phi3ForCausalLM": ("textcomplete.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("textcomplete.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("textcomplete.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("textcomplete.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("textcomplete.models.olmoe", "OlmoeForCausalLM"),
}

GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    # Mixtral has no entry: llama.cpp files it as "llama" with experts (see LlamaForCausalLM.config_from_gguf)
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "gemma3": "Gemma3ForConditionalGeneration",
                "phi3": "Phi3ForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


# The model families each architecture serves, as users know them (for `serve --help` and the README).
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "Llama 2, Llama 3/3.1/3.2, CodeLlama, TinyLlama, SmolLM/SmolLM2",
    "MistralForCausalLM": "Mistral (sliding window), Codestral",
    "Qwen2ForCausalLM": "Qwen2, Qwen2.5, Qwen2.5-Coder",
    "Qwen3ForCausalLM": "Qwen3",
    "GemmaForCausalLM": "Gemma",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text)",
    "Phi3ForCausalLM": "Phi-3, Phi-3.5-mini, Phi-4-mini",
    "MixtralForCausalLM": "Mixtral",
    "Qwen2MoeForCausalLM": "Qwen1.5-MoE, Qwen2-MoE",
    "Qwen3MoeForCausalLM": "Qwen3-MoE (e.g. Qwen3-30B-A3B)",
    "OlmoeForCausalLM": "OLMoE",
    "GPT2LMHeadModel": "GPT-2",
}


def families_text() -> str:
    """One line: every served family, in the order above."""
    return "; ".join(FAMILIES.values())


def architecture_of(config: dict) -> str:
    names = config.get("architectures") or []
    if not names and config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[config["model_type"]]]
    for name in names:
        if name in ARCHITECTURES:
            return name
    raise ValueError(f"unsupported model architecture {names or config.get('model_type')!r}; "
                     f"supported: {', '.join(sorted(ARCHITECTURES))}")


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported model architecture {architecture!r}; "
                         f"supported: {', '.join(sorted(ARCHITECTURES))}")
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)
