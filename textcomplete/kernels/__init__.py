"""Native kernels, compiled on first use with the machine's C++ compiler and cached.

`decode_layers()` returns the fused decode step of `decode.cpp`, or None when it cannot be built (no
compiler, no ninja, an unsupported platform); callers then run the same computation as PyTorch operators.
The build takes about a minute once per machine and torch version; later starts load the cached library.

With TEXTCOMPLETE_SANITIZE=address,undefined in the environment every native module is built instrumented
with AddressSanitizer and UndefinedBehaviorSanitizer instead (in its own cache directory), and any error they
find aborts the process. The ASan runtime must then be loaded first: start Python with
LD_PRELOAD=$(c++ -print-file-name=libasan.so) and ASAN_OPTIONS=detect_leaks=0 (tests/engine/test_sanitizers.py).
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

SANITIZE_ENV = "TEXTCOMPLETE_SANITIZE"
_SOURCE = Path(__file__).with_name("decode.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd"]
_OPENMP = ["-fopenmp"]   # links the OpenMP runtime torch has already loaded (same soname)
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def build_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of every native module in this process."""
    sanitizers = os.environ.get(SANITIZE_ENV, "").strip()
    if not sanitizers:
        return list(_FLAGS), []
    instrument = [f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    return ["-O1", "-g", "-march=native", "-fopenmp-simd", *instrument], instrument


def build_directory(name: str, source: Path, headers: tuple[Path, ...] = (), openmp: bool = False) -> Path:
    """The cache directory of one module's build: one per module, source (and the headers it includes),
    compiler flags, torch version and CPU (-march=native is CPU-specific)."""
    cflags, _ = build_flags()
    cflags += _OPENMP if openmp else []
    texts = [source.read_bytes(), *(h.read_bytes() for h in headers)]
    key = hashlib.sha256(b"\0".join([name.encode(), *texts, " ".join(cflags).encode(),
                                     torch.__version__.encode(), platform.machine().encode(),
                                     _cpu_model().encode()])).hexdigest()[:16]
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


def build_extension(name: str, source: Path, headers: tuple[Path, ...] = (), openmp: bool = False) -> ModuleType:
    """Compile (or load from the cache) the torch extension in `source`, which may include `headers`;
    raises if it cannot be built. `openmp` compiles it with OpenMP: at::parallel_for is an inline template
    that runs its loop on one thread unless the extension itself is built with OpenMP."""
    import fcntl

    from torch.utils.cpp_extension import load

    cflags, ldflags = build_flags()
    if ldflags:
        name += "_sanitized"
    cflags, ldflags = cflags + (_OPENMP if openmp else []), ldflags + (_OPENMP if openmp else [])
    build_dir = build_directory(name, source, headers, openmp)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch guards a build with a lock file that a killed build leaves behind, and every later build then
    # waits for it forever. An flock is released by the system when its holder dies: hold one around the
    # build, and remove torch's file when no live process of ours can be building.
    with open(build_dir / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        if not any(build_dir.glob("*.so")):
            log.info("building the native module %s (once per machine, about a minute) in %s", name, build_dir)
        return load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
                    build_directory=str(build_dir), verbose=False)


def decode_layers() -> ModuleType | None:
    """The compiled decode module (built on first call, then cached), or None if it cannot be built."""
    with _lock:
        if "decode" not in _built:
            _built["decode"] = _build_decode()
        return _built["decode"]


def decode_build_directory() -> Path:
    """Where the decode module is built and cached (for this source, its headers and these flags)."""
    return build_directory("textcomplete_decode", _SOURCE, _headers(), openmp=True)


def _build_decode() -> ModuleType | None:
    if platform.system() != "Linux":
        log.info("native decode kernels are built on Linux only; using PyTorch operators")
        return None
    try:
        return build_extension("textcomplete_decode", _SOURCE, _headers(), openmp=True)
    except Exception as exc:   # noqa: BLE001 - no compiler, no ninja, ...: the PyTorch path still works
        log.warning("could not build the native decode kernels (%s); decode steps use PyTorch operators",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None


def _headers() -> tuple[Path, ...]:
    """The headers both modules include: the block formats and their products (a change rebuilds both)."""
    return tuple(sorted((_SOURCE.parent / "quant").glob("*.h")))


def quant_matmul() -> ModuleType | None:
    """The compiled block-format matmul module of `quant_matmul.cpp` (built on first call, then cached), or
    None if it cannot be built; textcomplete.quant then decodes with PyTorch."""
    with _lock:
        if "quant_matmul" not in _built:
            _built["quant_matmul"] = _build_quant_matmul()
        return _built["quant_matmul"]


def _build_quant_matmul() -> ModuleType | None:
    if platform.system() != "Linux":
        log.info("native block-format kernels are built on Linux only; using PyTorch operators")
        return None
    try:
        return build_extension("textcomplete_quant_matmul", Path(__file__).with_name("quant_matmul.cpp"), _headers(),
                               openmp=True)
    except Exception as exc:   # noqa: BLE001 - no compiler, no ninja, ...: the PyTorch path still works
        log.warning("could not build the native block-format kernels (%s); GGUF weights are decoded with PyTorch",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None
