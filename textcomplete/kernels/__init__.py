"""Native kernels, compiled on first use with the machine's C++ compiler and cached.

`decode_layers()` returns the fused decode step of `decode.cpp`, or None when it cannot be built (no
compiler, no ninja, an unsupported platform); callers then run the same computation as PyTorch operators.
The build takes about a minute once per machine and torch version; later starts load the cached library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("decode.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def _cache_dir(source: bytes) -> Path:
    """One build directory per source, compiler flags, torch version and CPU (-march=native is CPU-specific)."""
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), torch.__version__.encode(),
                                     platform.machine().encode(), _cpu_model().encode()])).hexdigest()[:16]
    root = Path(os.environ.get("TEXTCOMPLETE_CACHE", Path.home() / ".cache" / "textcomplete"))
    return root / "kernels" / key


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def decode_layers() -> ModuleType | None:
    """The compiled decode module (built on first call, then cached), or None if it cannot be built."""
    with _lock:
        if "decode" not in _built:
            _built["decode"] = _build()
        return _built["decode"]


def _build() -> ModuleType | None:
    if platform.system() != "Linux":
        log.info("native decode kernels are built on Linux only; using PyTorch operators")
        return None
    from torch.utils.cpp_extension import load

    source = _SOURCE.read_bytes()
    build_dir = _cache_dir(source)
    cached = any(build_dir.glob("*.so"))
    build_dir.mkdir(parents=True, exist_ok=True)
    if not cached:
        log.info("building the native decode kernels (once per machine, about a minute) in %s", build_dir)
    try:
        return load(name="textcomplete_decode", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                    build_directory=str(build_dir), verbose=False)
    except Exception as exc:   # noqa: BLE001 - no compiler, no ninja, ...: the PyTorch path still works
        log.warning("could not build the native decode kernels (%s); decode steps use PyTorch operators",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None
