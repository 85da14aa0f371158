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
    stored_weights: bool = field(default=True, metadata={
        "help": "Run the checkpoint's matrices from the file as stored, through a memory map: a GGUF file's "
                "block formats (Q4_K, Q8_0, ...), a safetensors file's bfloat16/float16; memory is about the "
                "file's size. Activations stay float32, so results equal float32 on the stored values. "
                "--no-stored-weights expands them to --dtype in memory instead."})
    activations: str = field(default="float32", metadata={
        "help": "Activations of the products with stored weights: float32 (exact: equal to float32 on the "
                "stored values) or int8, which quantizes them to 8 bits in blocks of 32 for integer dot products: "
                "faster, not exact. Steps of more than 8 rows (prefill, wide batches) take them on Q8_0, Q4_0, "
                "Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights, decode steps on Q4_K, Q5_K and Q6_K (with AVX2: "
                "on all of them; with AVX-512 the others are as fast in float32 there); CPUs with AVX-512 VNNI "
                "or AVX2 (others stay float32)."})
    backend: str = field(default="auto", metadata={
        "help": "How the model runs: native (a dense Llama-family GGUF file: Llama, Mistral, SmolLM, Qwen2, "
                "Qwen3, with every matrix in a format the native kernels run, served by a library built from "
                "those kernels without loading torch, whose runtime alone is about 220 MiB of memory), torch "
                "(PyTorch modules: every model, device and option), or auto (native where it can, else torch)."})
    native_decode: bool = field(default=True, metadata={
        "help": "Run decode steps of Llama-family models in float32 through fused C++ layers, and the attention "
                "of prompt chunks through C++ too, compiled with the machine's C++ compiler on first use (about "
                "a minute, then cached); --no-native-decode, or a failed build, uses PyTorch operators."})
    device: str = field(default="auto", metadata={
        "help": "cpu, cuda, or auto (the GPU when torch has one)."})
    kv_cache_memory: int | None = field(default=None, metadata={
        "help": "Memory for the KV cache, e.g. 2GiB; default: a quarter of the memory available when the engine "
                "starts (MemAvailable), resident only as requests fill it. Requests beyond it wait or are "
                "preempted."})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "Element type of the KV cache: auto (the model's dtype), float32, bfloat16 or float16; the "
                "16-bit types halve its memory and round keys and values as they are stored."})
    block_size: int = field(default=16, metadata={"help": "Tokens per KV cache block."})
    # 256, not 512: on the CPU kernels a 256-row step computes a prompt as fast per token (SmolLM2-135M and
    # 1.7B/8B-shaped Q4_K_M files, both activation modes), and its temporaries, with the heap pages they
    # spread over, are half as large: 70-120 MiB less peak memory during a long prompt.
    max_num_batched_tokens: int = field(default=256, metadata={
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
        "help": "CPU threads of the kernels; default: one a core."})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.backend not in ("auto", "native", "torch"):
            raise ValueError(f"backend must be auto, native or torch, not {self.backend!r}")
        if self.activations not in ("float32", "int8"):
            raise ValueError(f"activations must be float32 or int8, not {self.activations!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, not {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("kv_cache_memory", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")

    def replace(self, **changes: object) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
