"""The native kernels as a plain shared library (`native.cpp`), for a process that does not load torch.

Built on first use with the machine's C++ compiler (the flags of the torch extensions: -march=native), cached
like them, and loaded with ctypes; its functions take pointers (numpy arrays' buffers). The block
formats' half-precision types come from torch's C++ headers, which are read from the installed package
without importing it. `load()` returns None, with a logged warning, when the library cannot be built.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import importlib.util
import logging
import os
import platform
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from textcomplete.kernels import SANITIZE_ENV, TARGETS, build_flags, cache_directory, headers, target_supported

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
_ERROR_SIZE = 1024
_lock = threading.Lock()
_loaded: dict[str, NativeLibrary | None] = {}

_i64, _f32p, _i64p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int64)
_ptrs, _err = ctypes.POINTER(ctypes.c_void_p), [ctypes.c_char_p, ctypes.c_size_t]
_SIGNATURES = {
    "tc_set_num_threads": ([ctypes.c_int], None),
    "tc_num_threads": ([], ctypes.c_int),
    "tc_vector_lanes": ([], ctypes.c_int),
    "tc_amx": ([], ctypes.c_int),
    "tc_int8_available": ([], ctypes.c_int),
    "tc_has_type": ([_i64], ctypes.c_int),
    "tc_matmul_parts": ([_f32p, _i64, _i64, _i64, ctypes.POINTER(ctypes.c_void_p), _i64p, _i64p, _i64p, _i64p, _f32p,
                         _i64, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
    "tc_dequantize": ([ctypes.c_void_p, _i64, _i64, _i64, _i64, _i64, _f32p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_size_t], ctypes.c_int),
    "tc_embed": ([ctypes.c_void_p, _i64, _i64, _i64, _i64, _i64, _i64p, _i64, _f32p, *_err], ctypes.c_int),
    "tc_llama_create": ([_i64, _i64, _i64, _i64, _i64, ctypes.c_double, _i64, _i64, ctypes.c_int, _i64, ctypes.c_int,
                         *_err], ctypes.c_void_p),
    "tc_llama_free": ([ctypes.c_void_p], None),
    "tc_llama_add_layer": ([ctypes.c_void_p, _f32p, _f32p, _f32p, _f32p, ctypes.c_void_p, _i64, _i64p, _ptrs, _i64p,
                            _i64p, _i64p, _i64p, _ptrs, _ptrs, *_err], ctypes.c_int),
    "tc_llama_step": ([ctypes.c_void_p, _f32p, _i64, _f32p, _f32p, _i64p, _i64, _i64p, _i64, _i64p, _i64, _i64p, _ptrs,
                       _i64p, *_err], ctypes.c_int),
    "tc_rms_norm": ([_f32p, _f32p, _f32p, _i64, _i64, ctypes.c_double], None),
}
# The KV cache's element types, as llama_step.h numbers them (bfloat16 has no numpy type: its bits as uint16).
CACHE_TYPES = {"float32": (0, np.float32), "float16": (1, np.float16), "bfloat16": (2, np.uint16)}


class NativeError(RuntimeError):
    """A native function refused its arguments (the message says why)."""


@dataclass(frozen=True)
class Stored:
    """A stored matrix: `rows` rows of `row_bytes` bytes, `stride` bytes apart, from `address` on, in the block
    format of GGML type `type`. `owner` keeps the memory it points into alive."""

    address: int
    rows: int
    row_bytes: int
    stride: int
    type: int
    owner: object = None

    @classmethod
    def of(cls, raw: np.ndarray, type_id: int) -> Stored:
        """A uint8 [rows, row_bytes] array (rows of contiguous bytes, any row stride) as a stored matrix."""
        if raw.dtype != np.uint8 or raw.ndim != 2 or (raw.shape[1] > 1 and raw.strides[1] != 1):
            raise ValueError(f"stored weights must be uint8 [rows, row_bytes] with contiguous rows, got {raw.dtype} "
                             f"{raw.shape} strides {raw.strides}")
        return cls(raw.ctypes.data, raw.shape[0], raw.shape[1], raw.strides[0], type_id, raw)


class NativeLibrary:
    """The loaded library's functions, over numpy arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        for name, (args, result) in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = args, result

    def set_num_threads(self, threads: int) -> None:
        self._lib.tc_set_num_threads(threads)

    def num_threads(self) -> int:
        return self._lib.tc_num_threads()

    def vector_lanes(self) -> int:
        return self._lib.tc_vector_lanes()

    def amx(self) -> bool:
        return bool(self._lib.tc_amx())

    def int8_available(self) -> bool:
        return bool(self._lib.tc_int8_available())

    def has_type(self, type_id: int) -> bool:
        return bool(self._lib.tc_has_type(type_id))

    def matmul(self, x: np.ndarray, parts: list[Stored], direct_rows: int, portable: bool = False,
               int8: bool = False) -> np.ndarray:
        """y [M, sum of the parts' rows] = x [M, K] @ [W_0; W_1; ...].T."""
        x = _float_rows(x)
        y = np.empty((x.shape[0], sum(p.rows for p in parts)), dtype=np.float32)
        count = len(parts)
        data = (ctypes.c_void_p * max(1, count))(*(p.address for p in parts))
        ints = lambda values: (ctypes.c_int64 * max(1, count))(*values)  # noqa: E731
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        status = self._lib.tc_matmul_parts(
            _floats(x), x.shape[0], x.shape[1], count, data, ints(p.rows for p in parts),
            ints(p.row_bytes for p in parts), ints(p.stride for p in parts), ints(p.type for p in parts), _floats(y),
            direct_rows, int(portable), int(int8), error, _ERROR_SIZE)
        _raise_on(status, error)
        return y

    def dequantize(self, part: Stored, k: int, portable: bool = False) -> np.ndarray:
        """The stored matrix's rows as float32 [rows, k]."""
        y = np.empty((part.rows, k), dtype=np.float32)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        status = self._lib.tc_dequantize(part.address, part.rows, part.row_bytes, part.stride, part.type, k,
                                         _floats(y), int(portable), error, _ERROR_SIZE)
        _raise_on(status, error)
        return y

    def embed(self, table: Stored, ids: np.ndarray, k: int) -> np.ndarray:
        """Rows `ids` of a stored [vocab, k] table as float32 [len(ids), k]."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.size, k), dtype=np.float32)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        status = self._lib.tc_embed(table.address, table.rows, table.row_bytes, table.stride, table.type, k,
                                    _longs(ids), ids.size, _floats(out), error, _ERROR_SIZE)
        _raise_on(status, error)
        return out

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x [rows, dim] * rsqrt(mean(x^2) + eps) * weight, per row."""
        x, weight = _float_rows(x), np.ascontiguousarray(weight, dtype=np.float32)
        if weight.shape != (x.shape[1],):
            raise ValueError(f"weight {weight.shape} does not fit rows of {x.shape[1]}")
        out = np.empty_like(x)
        self._lib.tc_rms_norm(_floats(x), _floats(weight), _floats(out), x.shape[0], x.shape[1], eps)
        return out

    def llama_layers(self, shape: LlamaShape) -> LlamaLayers:
        return LlamaLayers(self, shape)


@dataclass(frozen=True)
class LlamaShape:
    """The sizes a Llama-family layer stack runs at (llama_step.h, Shape)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    eps: float
    block_size: int
    num_slots: int
    cache_dtype: str          # a key of CACHE_TYPES
    direct_rows: int
    int8: bool = False


@dataclass(frozen=True)
class Matrix:
    """One matrix of a projection: its product's columns in `row_order` (output i is column row_order[i]) where
    given, plus `bias` where given."""

    weight: Stored
    row_order: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class PromptChunk:
    """A prompt chunk's rows of a step: `rows` consecutive rows, the queries of positions num_keys - rows ..
    num_keys - 1 of one request whose cache blocks are `block_table` (at least those of num_keys positions)."""

    rows: int
    block_table: np.ndarray
    num_keys: int


class LlamaLayers:
    """A Llama-family decoder layer stack in the native library (llama_step.h): layers added in order, then
    steps. Holds every array it was given for as long as it lives (the library keeps only pointers)."""

    def __init__(self, library: NativeLibrary, shape: LlamaShape) -> None:
        self._lib = library._lib
        self.shape = shape
        self._keep: list[object] = []
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        handle = self._lib.tc_llama_create(
            shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.rotary_dim, shape.eps, shape.block_size,
            shape.num_slots, CACHE_TYPES[shape.cache_dtype][0], shape.direct_rows, int(shape.int8), error,
            _ERROR_SIZE)
        if not handle:
            raise NativeError(error.value.decode(errors="replace"))
        self._handle = handle
        self.num_layers = 0

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.tc_llama_free(handle)

    def new_cache(self) -> np.ndarray:
        """A zeroed cache for one layer: [num_slots, 2, kv_heads, head_dim] of the shape's cache type."""
        s = self.shape
        return np.zeros((s.num_slots, 2, s.kv_heads, s.head_dim), dtype=CACHE_TYPES[s.cache_dtype][1])

    def add_layer(self, attn_norm: np.ndarray, ffn_norm: np.ndarray, q_norm: np.ndarray | None,
                  k_norm: np.ndarray | None, cache: np.ndarray, window: int,
                  projections: list[list[Matrix]]) -> None:
        """Append a layer: its norms, its cache (new_cache's shape and type, filled by the steps) and sliding
        window (0: none), and its qkv, o, gate_up and down projections."""
        s = self.shape
        if cache.dtype != CACHE_TYPES[s.cache_dtype][1] or cache.shape != (s.num_slots, 2, s.kv_heads, s.head_dim) \
                or not cache.flags.c_contiguous:
            raise ValueError(f"cache {cache.dtype} {cache.shape} is not this stack's {s.cache_dtype} "
                             f"[{s.num_slots}, 2, {s.kv_heads}, {s.head_dim}]")
        if len(projections) != 4:
            raise ValueError("four projections: qkv, o, gate_up, down")
        norms = [None if n is None else np.ascontiguousarray(n, dtype=np.float32)
                 for n in (attn_norm, ffn_norm, q_norm, k_norm)]
        matrices = [m for p in projections for m in p]
        orders = [None if m.row_order is None else np.ascontiguousarray(m.row_order, dtype=np.int64) for m in matrices]
        biases = [None if m.bias is None else np.ascontiguousarray(m.bias, dtype=np.float32) for m in matrices]
        for m, order, bias in zip(matrices, orders, biases):
            rows = (m.weight.rows,)
            if order is not None and order.shape != rows or bias is not None and bias.shape != rows:
                raise ValueError("a row order or bias has one entry per row of its matrix")
        count = len(matrices)
        ints = lambda values: (ctypes.c_int64 * max(1, count))(*values)  # noqa: E731
        pointers = lambda values: (ctypes.c_void_p * max(1, count))(*values)  # noqa: E731
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        status = self._lib.tc_llama_add_layer(
            self._handle, *(None if n is None else _floats(n) for n in norms), cache.ctypes.data, window,
            (ctypes.c_int64 * 4)(*(len(p) for p in projections)), pointers(m.weight.address for m in matrices),
            ints(m.weight.rows for m in matrices), ints(m.weight.row_bytes for m in matrices),
            ints(m.weight.stride for m in matrices), ints(m.weight.type for m in matrices),
            pointers(None if o is None else o.ctypes.data for o in orders),
            pointers(None if b is None else b.ctypes.data for b in biases), error, _ERROR_SIZE)
        _raise_on(status, error)
        self._keep += [norms, cache, matrices, orders, biases]
        self.num_layers += 1

    def step(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, slot_mapping: np.ndarray,
             key_slots: np.ndarray, key_lens: np.ndarray, chunks: list[PromptChunk]) -> np.ndarray:
        """Every layer over one step's rows: x [n, hidden] float32, decode rows first (one per request: the cache
        slots of its keys key_slots [decodes, width], key_lens [decodes] of them real), then the prompt chunks'
        rows; cos, sin [n, rotary_dim] (sin's first half negated); slot_mapping [n]: where each row's key and value
        go. Returns the last layer's hidden states [n, hidden] (a new array)."""
        out = np.array(x, dtype=np.float32, order="C", copy=True)
        n, decodes = out.shape[0], len(key_lens)
        cos, sin = (np.ascontiguousarray(a, dtype=np.float32) for a in (cos, sin))
        if cos.shape != (n, self.shape.rotary_dim) or sin.shape != cos.shape:
            raise ValueError(f"cos/sin: [{n}, {self.shape.rotary_dim}], got {cos.shape} and {sin.shape}")
        slots = _int64s(slot_mapping, (n,), "slot_mapping")
        key_slots = np.ascontiguousarray(key_slots, dtype=np.int64).reshape(decodes, -1) if decodes else \
            np.zeros((0, 1), dtype=np.int64)
        key_lens = _int64s(key_lens, (decodes,), "key_lens")
        if decodes + sum(c.rows for c in chunks) != n:
            raise ValueError(f"{decodes} decode rows and prompt chunks of {sum(c.rows for c in chunks)} rows are not "
                             f"the step's {n} rows")
        rows = np.cumsum([decodes, *(c.rows for c in chunks)], dtype=np.int64)
        tables = [np.ascontiguousarray(c.block_table, dtype=np.int64) for c in chunks]
        for c, table in zip(chunks, tables):
            if table.ndim != 1 or table.size * self.shape.block_size < c.num_keys:
                raise ValueError(f"a block table of {table.size} blocks does not hold {c.num_keys} keys")
        num_keys = np.array([c.num_keys for c in chunks], dtype=np.int64)
        error = ctypes.create_string_buffer(_ERROR_SIZE)
        status = self._lib.tc_llama_step(
            self._handle, _floats(out), n, _floats(cos), _floats(sin), _longs(slots), decodes, _longs(key_slots),
            key_slots.shape[1] if decodes else 0, _longs(key_lens), len(chunks), _longs(rows),
            (ctypes.c_void_p * max(1, len(tables)))(*(t.ctypes.data for t in tables)), _longs(num_keys), error,
            _ERROR_SIZE)
        _raise_on(status, error)
        return out


def _int64s(a: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.shape != shape:
        raise ValueError(f"{name}: int64 {list(shape)}, got {a.shape}")
    return a


def _longs(a: np.ndarray):
    return a.ctypes.data_as(_i64p)


def _float_rows(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(f"x must be float32 [M, K], got {x.dtype} {x.shape}")
    return np.ascontiguousarray(x)


def _floats(a: np.ndarray):
    return a.ctypes.data_as(_f32p)


def _raise_on(status: int, error: ctypes.Array) -> None:
    if status != 0:
        raise NativeError(error.value.decode(errors="replace"))


def load(target: str = "native") -> NativeLibrary | None:
    """The library built for `target` (kernels.TARGETS; built on first call, then cached), or None if it
    cannot be built."""
    if target not in TARGETS:
        raise ValueError(f"unknown build target {target!r}; known: {', '.join(TARGETS)}")
    if not target_supported(target):
        raise ValueError(f"this CPU does not run code built for {target!r}")
    with _lock:
        if target not in _loaded:
            _loaded[target] = _build_and_load(target)
        return _loaded[target]


def _build_and_load(target: str) -> NativeLibrary | None:
    if platform.system() != "Linux":
        log.info("the native library is built on Linux only")
        return None
    try:
        return NativeLibrary(build(target))
    except Exception as exc:   # noqa: BLE001 - no compiler, a compile error, ...: reported, the caller falls back
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("could not build the native library (%s)", detail)
        return None


@functools.cache
def _compiler() -> tuple[str, str]:
    """The C++ compiler's command and version line."""
    cxx = os.environ.get("CXX", "c++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    return cxx, version.splitlines()[0] if version else ""


def _torch_include() -> Path:
    """torch's C++ headers in the installed package (found without importing torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch's C++ headers are needed and torch is not installed")
    return Path(spec.submodule_search_locations[0]) / "include"


def build(target: str = "native") -> Path:
    """Compile the library for `target` into the cache (once; later calls find it) and return its path."""
    cxx, version = _compiler()
    cflags, ldflags = build_flags(target)
    name = "libtextcomplete_native" + ("" if target == "native" else f"_{target}") + ("_sanitized" if ldflags else "")
    directory = cache_directory(name, SOURCE, headers(), [*cflags, *ldflags, version, os.environ.get(SANITIZE_ENV, "")])
    path = directory / f"{name}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)   # released by the system if this process dies
        if path.exists():   # another process built it meanwhile
            return path
        log.info("building the native library %s (once per machine, about a minute) in %s", name, directory)
        partial = directory / f"{name}.so.partial"
        command = [cxx, "-std=c++20", "-fPIC", "-shared", *cflags, "-pthread", "-isystem", str(_torch_include()),
                   str(SOURCE), "-o", str(partial), *ldflags, "-pthread"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        partial.replace(path)   # whole or not at all: a killed build leaves no library behind
    return path
