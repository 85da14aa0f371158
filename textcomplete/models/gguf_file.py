"""Reading a GGUF file: its metadata as a Hugging Face style config, and its tensors under HF names.

The file's layout (header, metadata, tensor table) is parsed and checked here before any tensor is read:
a truncated file, a wrong magic, a count, length or tensor extent that does not fit in the file, or an
absurd shape gives one `ModelFileError` naming the file and the problem. Tensors are then read through a
read-only memory map; quantized ones (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, ...) are dequantized with the `gguf`
package. Each architecture's module maps the metadata and tensor names onto its Hugging Face form (undoing
the converter's changes, such as llama.cpp's reordering of Llama q/k rows), so the models see ordinary
checkpoints.

Reading the layout, the metadata and tensors as numpy arrays needs no torch (the serving path without it
reads its file here); the tensors in torch form, and the architecture classes, load torch when first asked.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from textcomplete.errors import ModelFileError
from textcomplete.models.mapping import map_weights
from textcomplete.models.registry import GGUF_ARCHITECTURES, architecture_of, model_class

if TYPE_CHECKING:
    import torch

    from textcomplete.quant.stored import StoredTensor

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


VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                   "tokenizer.ggml.token_type")


class GGUFFile:
    """A checked GGUF file; its architecture's module turns the metadata and tensors into HF form.

    Each architecture class provides `config_from_gguf(gguf) -> dict` and
    `tensors_from_gguf(gguf_name, tensor, config) -> [(hf_name, tensor), ...]` (empty to skip a tensor).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata, self.tensor_infos = read_layout(path)
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ModelFileError(path, f"unsupported GGUF architecture {self.arch!r}; "
                                       f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
        if not self.metadata.get("tokenizer.ggml.tokens"):
            raise ModelFileError(path, "the file has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
        self._model_class: type | None = None
        self._data: np.ndarray | None = None

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer's arrays (tokens, merges, scores, token types) once a tokenizer is built from
        them. As Python objects they are megabytes (tens of them for a 128K-token vocabulary) that a serving
        process would otherwise hold for nothing; the tokenizer keeps its own copy."""
        for key in VOCABULARY_KEYS:
            self.metadata.pop(key, None)

    @property
    def model_class(self) -> type:
        """The architecture's class (its module loads torch: taken only when asked for)."""
        if self._model_class is None:
            self._model_class = model_class(GGUF_ARCHITECTURES[self.arch])
        return self._model_class

    @model_class.setter
    def model_class(self, cls: type) -> None:
        self._model_class = cls

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_infos)

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    def get(self, key: str, default: object = None) -> object:
        """The architecture's metadata value `<arch>.<key>`."""
        return self.metadata.get(f"{self.arch}.{key}", default)

    def size(self, key: str, default: int | None = None) -> int:
        """A positive whole-number setting of the architecture's metadata (required unless a default)."""
        value = self.get(key, default)
        if value is None:
            raise self.fail(f"the metadata lacks {self.arch}.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
            raise self.fail(f"metadata {self.arch}.{key} = {value!r} is not a plausible size")
        return value

    def hf_config(self) -> dict:
        cfg = self.model_class.config_from_gguf(self)
        # One GGUF architecture may hold several HF ones (llama.cpp's "llama" holds Mixtral): the class the
        # config names reads the metadata and converts the tensors from then on.
        named = model_class(architecture_of(cfg))
        if named is not self.model_class:
            self.model_class = named
            cfg = named.config_from_gguf(self)
        return cfg

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor by its GGUF name, as float32 in PyTorch's dimension order."""
        import torch

        return torch.from_numpy(self.read_array(name))

    def read_array(self, name: str) -> np.ndarray:
        """One tensor by its GGUF name, as a float32 numpy array in PyTorch's dimension order."""
        return _dequantized(self._mapped(), self.tensor_info(name))

    def tensor_info(self, name: str) -> TensorInfo:
        for t in self.tensor_infos:
            if t.name == name:
                return t
        raise self.fail(f"the file has no tensor {name!r}")

    def raw_rows(self, name: str) -> np.ndarray:
        """A matrix's bytes as stored, uint8 [rows, row_bytes] (a view of the mapped file: nothing is read)."""
        t = self.tensor_info(name)
        rows = math.prod(t.shape[1:])
        return self._mapped()[t.offset:t.offset + t.n_bytes].reshape(rows, -1)

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self.tensor_infos)

    def tensors(self, stored: bool = True) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
        """(HF name, tensor in HF layout), one at a time: with `stored`, the matrices the architecture runs
        from their stored format stay `StoredTensor` views of the file; everything else is float32."""
        import torch

        cfg = self.hf_config()
        for t in self.tensor_infos:
            keep = stored and self._storable(t) and self.model_class.keeps_stored(t.name)
            tensor = self._stored(t) if keep else torch.from_numpy(_dequantized(self._mapped(), t))
            converted = self.model_class.tensors_from_gguf(t.name, tensor, cfg)
            if converted is None:
                raise self.fail(f"unexpected tensor {t.name!r} for {self.arch}")
            yield from converted

    @staticmethod
    def _storable(t: TensorInfo) -> bool:
        from textcomplete.quant import FORMATS

        return len(t.shape) >= 2 and t.type != GGMLQuantizationType.F32 and int(t.type) in FORMATS

    def _stored(self, t: TensorInfo) -> StoredTensor:
        """A view of tensor `t`'s bytes as [*rows, row_bytes] (no copy: pages are read when a kernel reads them)."""
        import torch

        from textcomplete.quant import format_of
        from textcomplete.quant.stored import StoredTensor

        shape = tuple(reversed(t.shape))
        raw = torch.from_numpy(self._mapped()[t.offset:t.offset + t.n_bytes])
        return StoredTensor.of(raw.view(*shape[:-1], -1), format_of(int(t.type)), shape)

    def _mapped(self) -> np.ndarray:
        if self._data is None:
            self._data = map_weights(self.path)
        return self._data


def split_name(gguf_name: str) -> tuple[int | None, str, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q', 'weight'); 'output_norm.weight' -> (None, 'output_norm', 'weight')."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match:
        layer, part, kind = match.groups()
        return int(layer), part, kind
    base, _, kind = gguf_name.rpartition(".")
    return None, base, kind


def hf_name(gguf_name: str, table: dict[str, str], layer_prefix: str = "model.layers") -> str | None:
    """The HF name of a GGUF tensor under `table` (GGUF part -> HF part); None when the table lacks it."""
    layer, part, kind = split_name(gguf_name)
    if part not in table:
        return None
    return f"{layer_prefix}.{layer}.{table[part]}.{kind}" if layer is not None else f"{table[part]}.{kind}"


def llama_style_config(gguf: GGUFFile) -> dict:
    """The HF config keys every Llama-like architecture shares, read from `<arch>.*` metadata."""
    m = gguf.metadata
    vocab = gguf.size("vocab_size", len(m["tokenizer.ggml.tokens"]))
    hidden, heads = gguf.size("embedding_length"), gguf.size("attention.head_count")
    cfg = {"architectures": [GGUF_ARCHITECTURES[gguf.arch]], "hidden_size": hidden, "num_attention_heads": heads,
           "num_key_value_heads": gguf.size("attention.head_count_kv", heads),
           "head_dim": gguf.size("attention.key_length", hidden // heads or None),
           "intermediate_size": gguf.size("feed_forward_length"), "num_hidden_layers": gguf.size("block_count"),
           "rms_norm_eps": gguf.get("attention.layer_norm_rms_epsilon", 1e-6),
           "rope_theta": gguf.get("rope.freq_base", 10000.0),
           "max_position_embeddings": gguf.size("context_length", 2048), "vocab_size": vocab,
           "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
           "eos_token_id": m.get("tokenizer.ggml.eos_token_id")}
    if heads % cfg["num_key_value_heads"]:
        raise gguf.fail(f"{heads} attention heads cannot share {cfg['num_key_value_heads']} key/value heads")
    scaling = gguf.get("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": gguf.get("rope.scaling.factor")}
    elif scaling == "yarn":   # the converter's keys, back to transformers' names
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": gguf.get("rope.scaling.factor"),
                               "original_max_position_embeddings": gguf.size("rope.scaling.original_context_length")}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if gguf.get(f"rope.scaling.{key}") is not None:
                cfg["rope_scaling"][name] = gguf.get(f"rope.scaling.{key}")
    window = gguf.get("attention.sliding_window")
    if window:
        cfg["sliding_window"] = gguf.size("attention.sliding_window")
    return cfg


def qk_row_order(rows: int, num_heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's interleaving of each head's rotary halves in q/k projection rows:
    HF row i is the file's row order[i]."""
    return np.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def unpermute_qk(w: torch.Tensor | StoredTensor, num_heads: int) -> torch.Tensor | StoredTensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in the q/k projection rows."""
    import torch

    from textcomplete.quant.stored import StoredTensor

    order = torch.from_numpy(qk_row_order(w.shape[0], num_heads))
    if isinstance(w, StoredTensor):   # the same reorder, recorded rather than copied
        return w.reorder_rows(order)
    return w[order]


def _dequantized(data: np.ndarray, t: TensorInfo) -> np.ndarray:
    """Tensor `t` as float32 in PyTorch's dimension order (decoded, except F32, which is used in place)."""
    raw = data[t.offset:t.offset + t.n_bytes]
    shape = tuple(reversed(t.shape))
    if t.type == GGMLQuantizationType.F32:   # a view, no copy (the mapping is copy-on-write)
        return raw.view("<f4").reshape(shape)
    elif t.type == GGMLQuantizationType.F16:
        array = raw.view("<f2").astype(np.float32)
    else:
        block, block_bytes = GGML_QUANT_SIZES[t.type]
        array = dequantize(raw.reshape(*shape[:-1], shape[-1] // block * block_bytes), t.type)
    return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
