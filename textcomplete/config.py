"""Engine configuration: one frozen dataclass whose field docs become the CLI help.

Every setting that changes what the engine computes or how much memory it takes lives here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
               "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str | int) -> int:
    """Parse a memory size such as ``2GiB``, ``512M`` or ``1073741824`` into bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 2GiB, 512MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads and runs one model."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "A local Hugging Face directory, a .gguf file, a hub id (owner/repo), one GGUF file of a hub "
                f"repository by its quantization (owner/repo:Q4_K_M), or the built-in default {DEFAULT_MODEL}."})
    dtype: str = field(default="auto", metadata={
        "help": "Weight and activation precision: float32, bfloat16, float16, or auto "
                "(float32 on the CPU, bfloat16 on a GPU)."})
    quantization: str = field(default="none", metadata={
        "help": "Weight-only quantization of the linear layers on the CPU: none (exact float weights), int8 "
                "(per channel) or int4 (groups of 32); int8 and int4 decode faster and round activations "
                "to bfloat16 in matmuls."})
    stored_weights: bool = field(default=False, metadata={
        "help": "Run a GGUF file's matrices from their stored block formats (Q4_K, Q8_0, ...: memory about the "
                "file's size) instead of expanding them to float32. Off by default until the fused decode "
                "layers read stored formats too; exact either way."})
    native_decode: bool = field(default=True, metadata={
        "help": "Run decode steps of Llama-family models in float32 through fused C++ layers, compiled with "
                "the machine's C++ compiler on first use (about a minute, then cached); --no-native-decode, "
                "or a failed build, uses PyTorch operators."})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, or auto (the GPU when torch has one)."})
    kv_cache_memory: int = field(default=2 << 30, metadata={
        "help": "Memory for the KV cache, e.g. 2GiB. Requests beyond it wait or are preempted."})
    block_size: int = field(default=16, metadata={"help": "Tokens per KV cache block."})
    max_num_batched_tokens: int = field(default=512, metadata={
        "help": "Token budget of one engine step; long prompts are prefilled in chunks of at most this."})
    max_num_seqs: int = field(default=64, metadata={
        "help": "Most requests that run in one step."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "Reuse the KV cache of full blocks shared with earlier prompts (--no-prefix-caching: off)."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Context length; default: the model's own."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the generator shared by requests that bring no seed of their own."})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch; default: torch's own choice."})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.quantization not in ("none", "int8", "int4"):
            raise ValueError(f"quantization must be none, int8 or int4, not {self.quantization!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("kv_cache_memory", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")

    def replace(self, **changes: object) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
