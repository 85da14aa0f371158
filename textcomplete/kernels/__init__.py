"""Native kernels, compiled on first use with the machine's C++ compiler and cached.

`decode_layers()` returns the fused decode step of `decode.cpp`, or None when it cannot be built (no
compiler, no ninja, an unsupported platform); callers then run the same computation as PyTorch operators.
The build takes about a minute once per machine and torch version; later starts load the cached library.
Those modules are torch extensions; `library.py` builds the same kernels as a plain shared library for a
process without torch (this module imports torch only to build an extension).

The modules are compiled for the CPU that builds them (-march=native): AVX-512 vector code on AVX-512
machines, AVX2 on the others that have it, portable C++ elsewhere. A `target` of "avx2" builds the AVX2 code on
an AVX-512 machine too (its own module and cache entry), so that one machine tests both; on an AVX2 machine it
is the native module.

With TEXTCOMPLETE_SANITIZE=address,undefined in the environment every native module is built instrumented
with AddressSanitizer and UndefinedBehaviorSanitizer instead (in its own cache directory), and any error they
find aborts the process. The ASan runtime must then be loaded first: start Python with
LD_PRELOAD=$(c++ -print-file-name=libasan.so) and ASAN_OPTIONS=detect_leaks=0 (tests/engine/test_sanitizers.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SANITIZE_ENV = "TEXTCOMPLETE_SANITIZE"
# Up to this many rows of x a product streams the weights once, decoding blocks in registers (decode steps:
# bandwidth-bound); wider ones decode tiles of weight rows once and multiply them in a micro-kernel.
# Measured at 2048 x 8192 on 2 cores: the direct path is faster up to 8 rows, level at 12 to 16.
DIRECT_ROWS = 8
_SOURCE = Path(__file__).with_name("decode.cpp")
# Hidden visibility: only the module's init function is exported (pybind11 marks it), so calls between the
# module's own functions are direct, not through the PLT as calls to symbols another library could replace.
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fvisibility=hidden"]
_OPENMP = ["-fopenmp"]   # links the OpenMP runtime torch has already loaded (same soname)
# Instruction sets a module can be built for, beyond the building CPU's own ("native"): the flags that take
# -march=native down to each.
TARGETS: dict[str, list[str]] = {"native": [], "avx2": ["-mno-avx512f"],
                                  "avx512": ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]}
_lock = threading.Lock()
_built: dict[tuple[str, str], ModuleType | None] = {}


def build_flags(target: str = "native") -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of the native modules built for `target` in this process."""
    if target not in TARGETS:
        raise ValueError(f"unknown build target {target!r}; known: {', '.join(TARGETS)}")
    sanitizers = os.environ.get(SANITIZE_ENV, "").strip()
    if not sanitizers:
        return [*_FLAGS, *TARGETS[target]], []
    instrument = [f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    return ["-O1", "-g1", "-march=native", *TARGETS[target], "-fopenmp-simd", *instrument], instrument


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 Linux: /proc/cpuinfo), or none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def target_supported(target: str) -> bool:
    """Whether this CPU runs code built for `target`."""
    if target == "native":
        return True
    return {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw"}}[target] <= cpu_flags()


def _same_as_native(target: str) -> bool:
    """Whether `target`'s flags take nothing away from this CPU's own build (AVX2 on a CPU without AVX-512,
    AVX-512 without AMX on a CPU without AMX): its module would be the native one compiled twice."""
    return (target == "native" or (target == "avx2" and "avx512f" not in cpu_flags())
            or (target == "avx512" and "amx_tile" not in cpu_flags()))


def build_directory(name: str, source: Path, headers: tuple[Path, ...] = (), openmp: bool = False,
                    target: str = "native") -> Path:
    """The cache directory of one module's build: one per module, source (and the headers it includes), its
    path, compiler flags, torch version and CPU (-march=native is CPU-specific). torch's build file records the
    source's path, so two checkouts of the same code sharing one directory would rebuild it in turn, each start
    after the other's paying for a build."""
    import torch

    cflags, _ = build_flags(target)
    cflags += _OPENMP if openmp else []
    return cache_directory(name, source, headers, [*cflags, torch.__version__], by_path=True)


def cache_directory(name: str, source: Path, headers: tuple[Path, ...], settings: list[str],
                    by_path: bool = False) -> Path:
    """A build's cache directory, keyed by its name, sources, settings (flags, versions), the machine and CPU,
    and with `by_path` the source's path."""
    texts = [source.read_bytes(), *(h.read_bytes() for h in headers)]
    where = [str(source.resolve()).encode()] if by_path else []
    key = hashlib.sha256(b"\0".join([name.encode(), *where, *texts, " ".join(settings).encode(),
                                     platform.machine().encode(), _cpu_model().encode()])).hexdigest()[:16]
    return cache_root() / "kernels" / key


def cache_root() -> Path:
    return Path(os.environ.get("TEXTCOMPLETE_CACHE", Path.home() / ".cache" / "textcomplete"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_extension(name: str, source: Path, headers: tuple[Path, ...] = (), openmp: bool = False,
                    target: str = "native") -> ModuleType:
    """Compile (or load from the cache) the torch extension in `source`, which may include `headers`, for
    `target` (TARGETS); raises if it cannot be built. `openmp` compiles it with OpenMP: at::parallel_for is an
    inline template that runs its loop on one thread unless the extension itself is built with OpenMP."""
    import fcntl

    from torch.utils.cpp_extension import load

    cflags, ldflags = build_flags(target)
    if target != "native":   # a module's name is its identity in a process: one per target
        name += f"_{target}"
    if ldflags:
        name += "_sanitized"
    cflags, ldflags = cflags + (_OPENMP if openmp else []), ldflags + (_OPENMP if openmp else [])
    build_dir = build_directory(name, source, headers, openmp, target)
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


def decode_layers(target: str = "native") -> ModuleType | None:
    """The compiled decode module (built on first call, then cached), or None if it cannot be built."""
    return _module("decode", target)


def decode_build_directory() -> Path:
    """Where the decode module is built and cached (for this source, its headers and these flags)."""
    return build_directory("textcomplete_decode", _SOURCE, headers(), openmp=True)


def quant_matmul(target: str = "native") -> ModuleType | None:
    """The compiled block-format matmul module of `quant_matmul.cpp` (built on first call, then cached), or
    None if it cannot be built; textcomplete.quant then decodes with PyTorch."""
    return _module("quant_matmul", target)


# Each module: its source, and what is lost (logged) when it cannot be built.
_MODULES = {
    "decode": (_SOURCE, "native decode kernels", "decode steps use PyTorch operators"),
    "quant_matmul": (_SOURCE.with_name("quant_matmul.cpp"), "native block-format kernels",
                     "GGUF weights are decoded with PyTorch"),
}


def _module(kind: str, target: str) -> ModuleType | None:
    if target not in TARGETS:
        raise ValueError(f"unknown build target {target!r}; known: {', '.join(TARGETS)}")
    if target_supported(target) and _same_as_native(target):
        target = "native"
    with _lock:
        if (kind, target) not in _built:
            _built[kind, target] = _build(kind, target)
        return _built[kind, target]


def _build(kind: str, target: str) -> ModuleType | None:
    source, what, fallback = _MODULES[kind]
    if platform.system() != "Linux":
        log.info("%s are built on Linux only; %s", what, fallback)
        return None
    try:
        return build_extension(f"textcomplete_{kind}", source, headers(), openmp=True, target=target)
    except Exception as exc:   # noqa: BLE001 - no compiler, no ninja, ...: the PyTorch path still works
        log.warning("could not build the %s (%s); %s", what,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__, fallback)
        return None


def headers() -> tuple[Path, ...]:
    """The headers the modules include: the block formats and their products, the decode attention (a change
    rebuilds both modules)."""
    return tuple(sorted([*_SOURCE.parent.glob("*.h"), *(_SOURCE.parent / "quant").glob("*.h")]))
