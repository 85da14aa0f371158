"""Reading a GGUF file: its metadata as a Hugging Face style config, and its tensors under HF names.

The file's layout (header, metadata, tensor table) is parsed and checked here before any tensor is read:
a truncated file, a wrong magic, a count, length or tensor extent that does not fit in the file, or an
absurd shape gives one `ModelFileError` naming the file and the problem. Tensors are then read through a
read-only memory map; quantized ones (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, ...) are dequantized with the `gguf`
package, and llama.cpp's reordering of Llama q/k rows is undone, so the architectures see ordinary checkpoints.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from textcomplete.errors import ModelFileError
from textcomplete.models.registry import GGUF_ARCHITECTURES

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4
_MAX_TENSORS = 1 << 20
_MAX_SIZE = 1 << 24   # no model dimension, count or context length is larger
# Metadata value types: scalar struct formats (little-endian), then STRING = 8 and ARRAY = 9.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]          # GGUF order: the fastest-varying dimension first
    type: GGMLQuantizationType
    offset: int                     # from the start of the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads the header's little-endian fields, each one checked against the end of the file."""

    def __init__(self, path: Path, data: mmap.mmap) -> None:
        self.path, self.data, self.pos = path, data, 0

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"the file is truncated or damaged: {what} at byte {self.pos} needs {n} bytes, "
                            f"but the file has {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("Q", what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, kind: int, what: str) -> object:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise self.fail(f"{what} has an unknown value type {kind}")
        item, count = self.scalar("I", what + " item type"), self.scalar("Q", what + " length")
        if item in _NUMPY:
            width = np.dtype(_NUMPY[item]).itemsize
            return np.frombuffer(self.take(count * width, what), dtype=_NUMPY[item]).tolist()
        if count > len(self.data) - self.pos:   # every item takes at least a byte: a lying count stops here
            raise self.fail(f"{what} claims {count} items, more than the file's remaining bytes")
        return [self.value(item, what) for _ in range(count)]


def read_layout(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    """The metadata and the checked tensor table of a GGUF file; ModelFileError if the file is not sound."""
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:   # unreadable, or empty (an empty file cannot be mapped)
        raise ModelFileError(path, f"cannot be read as a GGUF file ({exc})") from None
    cur = _Cursor(path, data)
    magic = cur.take(4, "the magic number") if len(data) >= 4 else b""
    if magic != _MAGIC:
        raise cur.fail(f"not a GGUF file: it starts with {bytes(data[:4])!r}, not {_MAGIC!r}")
    version = cur.scalar("I", "the version")
    if version not in _VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (supported: {', '.join(map(str, _VERSIONS))})")
    n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
    if n_tensors > _MAX_TENSORS or n_kv > len(data):
        raise cur.fail(f"the header claims {n_tensors} tensors and {n_kv} metadata entries, which cannot be")
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        metadata[key] = cur.value(cur.scalar("I", f"the type of {key!r}"), f"metadata {key!r}")
    raw = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} claims {n_dims} dimensions (GGUF tensors have 1 to {_MAX_DIMS})")
        shape = tuple(cur.scalar("Q", f"the shape of tensor {name!r}") for _ in range(n_dims))
        raw.append((name, shape, cur.scalar("I", f"the type of tensor {name!r}"),
                    cur.scalar("Q", f"the offset of tensor {name!r}")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor_info(path, len(data), data_start, *entry) for entry in raw]
    return metadata, tensors


def _tensor_info(path: Path, file_size: int, data_start: int, name: str, shape: tuple[int, ...],
                 type_id: int, offset: int) -> TensorInfo:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ModelFileError(path, f"tensor {name!r} has an unknown type {type_id}") from None
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    dims = " x ".join(map(str, shape))
    if any(d == 0 for d in shape) or shape[0] % block:
        raise ModelFileError(path, f"tensor {name!r} has an impossible shape {dims} for {qtype.name} "
                                   f"(rows of a multiple of {block} values)")
    start, n_bytes = data_start + offset, math.prod(shape) // block * block_bytes
    if start + n_bytes > file_size:
        raise ModelFileError(path, f"tensor {name!r} ({dims}, {qtype.name}) needs bytes {start} to "
                                   f"{start + n_bytes}, past the end of the file ({file_size} bytes): the "
                                   "file is truncated or its tensor table is damaged")
    return TensorInfo(name, shape, qtype, start, n_bytes)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata, self.tensor_infos = read_layout(path)
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ModelFileError(path, f"unsupported GGUF architecture {self.arch!r}; "
                                       f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
        if not self.metadata.get("tokenizer.ggml.tokens"):
            raise ModelFileError(path, "the file has no tokenizer (no tokenizer.ggml.tokens in its metadata)")

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_infos)

    def _size(self, key: str, default: int | None = None) -> int:
        """A positive whole-number setting of the architecture's metadata (required unless a default)."""
        value = self.metadata.get(f"{self.arch}.{key}", default)
        if value is None:
            raise ModelFileError(self.path, f"the metadata lacks {self.arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
            raise ModelFileError(self.path, f"metadata {self.arch}.{key} = {value!r} is not a plausible size")
        return value

    def hf_config(self) -> dict:
        m, p = self.metadata, self.arch + "."
        vocab = self._size("vocab_size", len(m["tokenizer.ggml.tokens"]))
        arch = GGUF_ARCHITECTURES[self.arch]
        if self.arch == "gpt2":
            return {"architectures": [arch], "n_embd": self._size("embedding_length"),
                    "n_head": self._size("attention.head_count"), "n_layer": self._size("block_count"),
                    "n_positions": self._size("context_length"), "vocab_size": vocab,
                    "layer_norm_epsilon": m.get(p + "attention.layer_norm_epsilon", 1e-5),
                    "n_inner": self._size("feed_forward_length") if p + "feed_forward_length" in m else None,
                    "activation_function": "gelu_new"}
        hidden, heads = self._size("embedding_length"), self._size("attention.head_count")
        cfg = {"architectures": [arch], "hidden_size": hidden, "num_attention_heads": heads,
               "num_key_value_heads": self._size("attention.head_count_kv", heads),
               "head_dim": self._size("attention.key_length", hidden // heads or None),
               "intermediate_size": self._size("feed_forward_length"), "num_hidden_layers": self._size("block_count"),
               "rms_norm_eps": m.get(p + "attention.layer_norm_rms_epsilon", 1e-6),
               "rope_theta": m.get(p + "rope.freq_base", 10000.0),
               "max_position_embeddings": self._size("context_length", 2048), "vocab_size": vocab,
               "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
               "eos_token_id": m.get("tokenizer.ggml.eos_token_id")}
        if heads % cfg["num_key_value_heads"]:
            raise ModelFileError(self.path, f"{heads} attention heads cannot share {cfg['num_key_value_heads']} "
                                            "key/value heads")
        if m.get(p + "rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": m[p + "rope.scaling.factor"]}
        return cfg

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF layout), one at a time."""
        cfg = self.hf_config()
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        for t in self.tensor_infos:
            name = self._hf_name(t.name)
            if name is None:
                raise ModelFileError(self.path, f"unexpected tensor {t.name!r} for {self.arch}")
            yield name, self._convert(name, _dequantized(data, t), cfg)

    def _hf_name(self, gguf_name: str) -> str | None:
        table = _GPT2_NAMES if self.arch == "gpt2" else _LLAMA_NAMES
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
        if match:
            layer, part, kind = match.groups()
            prefix = "transformer.h" if self.arch == "gpt2" else "model.layers"
            return f"{prefix}.{layer}.{table[part]}.{kind}" if part in table else None
        base, _, kind = gguf_name.rpartition(".")
        return f"{table[base]}.{kind}" if base in table else None

    def _convert(self, name: str, tensor: torch.Tensor, cfg: dict) -> torch.Tensor:
        if self.arch == "gpt2" and name.endswith(_GPT2_CONV1D):
            return tensor.t()   # back to HF's Conv1D layout [in, out]
        if self.arch in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                return _unpermute(tensor, cfg["num_attention_heads"])
            if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                return _unpermute(tensor, cfg["num_key_value_heads"])
        return tensor


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in the q/k projection rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantized(data: np.memmap, t: TensorInfo) -> torch.Tensor:
    """A float32 copy of tensor `t` (the mapped file is read-only), in PyTorch's dimension order."""
    raw = data[t.offset:t.offset + t.n_bytes]
    shape = tuple(reversed(t.shape))
    if t.type == GGMLQuantizationType.F32:
        array = np.array(raw.view("<f4"), dtype=np.float32)
    elif t.type == GGMLQuantizationType.F16:
        array = raw.view("<f2").astype(np.float32)
    else:
        block, block_bytes = GGML_QUANT_SIZES[t.type]
        array = dequantize(raw.reshape(*shape[:-1], shape[-1] // block * block_bytes), t.type)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))
