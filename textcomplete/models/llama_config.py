"""The settings of the Llama family read from a configuration: rotary embedding, sliding windows, context length,
and the configuration of a GGUF file. Plain functions of dicts (no torch): the PyTorch models
(textcomplete.models.llama and the families built on it) and the native one (native_llama.py) share them.
"""

from __future__ import annotations

from textcomplete.models import gguf_file
from textcomplete.models.rope import rope_kind


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the classic keys or transformers' newer `rope_parameters`.

    As in transformers, a scaling that needs the pretraining length and lacks one gets `max_position_embeddings`.
    """
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if rope_kind(params) != "default" else None)
    if rope_kind(scaling) in ("llama3", "yarn", "longrope") and not scaling.get("original_max_position_embeddings"):
        scaling = {**scaling, "original_max_position_embeddings": cfg.get("max_position_embeddings", 2048)}
    return float(theta), scaling


def sliding_windows(cfg: dict) -> list[int | None]:
    """Each layer's sliding attention window (None: it sees every earlier position), as transformers reads it."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return [None] * n
    if cfg.get("layer_types"):
        return [window if kind == "sliding_attention" else None for kind in cfg["layer_types"]]
    first = cfg.get("max_window_layers", 0) if "use_sliding_window" in cfg else 0   # Qwen2's convention
    return [window if i >= first else None for i in range(n)]


def context_length(cfg: dict) -> int:
    """The longest context: `max_position_embeddings`, or what a YaRN scaling stretches the original to.

    Qwen2.5's configs keep max_position_embeddings at the original 32768 and add YaRN with factor 4 to reach
    131072 (vLLM serves it so too); the frequencies do not depend on the length, so nothing else changes.
    """
    length = cfg.get("max_position_embeddings", 2048)
    _, scaling = rope_settings(cfg)
    if rope_kind(scaling) == "yarn" and scaling.get("factor"):
        original = scaling.get("original_max_position_embeddings") or length
        length = max(length, int(scaling["factor"] * original))
    return length


def llama_gguf_config(gguf: gguf_file.GGUFFile) -> dict:
    """The Hugging Face config of a Llama-family GGUF file."""
    cfg = gguf_file.llama_style_config(gguf)
    if gguf.has_tensor("rope_freqs.weight"):
        # Llama 3.1's scaling as the converter stores it: one wavelength factor per rotary pair
        factors = gguf.read_array("rope_freqs.weight").reshape(-1).tolist()
        cfg["rope_scaling"] = {**(cfg.get("rope_scaling") or {"rope_type": "default"}), "frequency_factors": factors}
    if gguf.arch == "llama" and gguf.get("expert_count"):
        # llama.cpp files Mixtral as "llama" with experts; so named, GGUFFile hands the file to that class
        cfg["architectures"] = ["MixtralForCausalLM"]
    return cfg
