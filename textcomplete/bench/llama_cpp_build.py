"""Building llama.cpp's `llama-server` and `llama-quantize` from the llama.cpp vendored in llama-cpp-python's sdist.

The build is cached: a marker file beside the binaries names the version and the CMake flags it was built with,
and a later run with the same version and flags reuses the binaries instead of building again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
TARGETS = ("llama-server", "llama-quantize")
# CPU only, tuned for this machine; no HTTPS client (no OpenSSL), no tests, examples, app or web UI: the
# web UI would otherwise be fetched from the network at build time. AMX is left out: CPUs of virtual machines
# can advertise it without the kernel letting a process use its tiles, and the first AMX instruction then
# kills the server (SIGILL); explicit -mno-* options win over -march=native whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}",
               f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")
MARKER = "textcomplete-build.json"


def cache_root() -> Path:
    return Path(os.path.expanduser("~/.cache/textcomplete"))


@dataclass(frozen=True)
class LlamaCppBinaries:
    server: Path
    quantize: Path
    version: str = VERSION


def marker_content(version: str, flags: tuple[str, ...], targets: tuple[str, ...] = TARGETS) -> dict:
    return {"version": version, "flags": list(flags), "targets": list(targets)}


def cached_binaries(build_dir: Path, version: str = VERSION, flags: tuple[str, ...] = CMAKE_FLAGS) -> \
        LlamaCppBinaries | None:
    """The binaries of an earlier build with this version and these flags, or None if there is none."""
    marker = build_dir / MARKER
    try:
        if json.loads(marker.read_text()) != marker_content(version, flags):
            return None
    except (OSError, ValueError):
        return None
    found = binaries_in(build_dir, version)
    return found if found.server.is_file() and found.quantize.is_file() else None


def binaries_in(build_dir: Path, version: str = VERSION) -> LlamaCppBinaries:
    return LlamaCppBinaries(build_dir / "bin" / "llama-server", build_dir / "bin" / "llama-quantize", version)


def ensure_built(root: Path | None = None, log: Callable[[str], None] = print,
                 allow_apt: bool = True) -> LlamaCppBinaries:
    """Build (or reuse) llama-server and llama-quantize; several minutes on two cores the first time."""
    base = (root or cache_root()) / f"llama.cpp-{VERSION}"
    source, build = base / "src", base / "src" / "build"
    cached = cached_binaries(build)
    if cached is not None:
        log(f"llama.cpp {VERSION}: reusing {cached.server} and {cached.quantize}")
        return cached
    _check_tools(allow_apt, log)
    if not (source / "CMakeLists.txt").is_file():
        _extract(_sdist(root or cache_root(), log), source, log)
    (build / MARKER).unlink(missing_ok=True)
    log(f"llama.cpp {VERSION}: configuring in {build}")
    _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], base / "configure.log", log)
    log(f"llama.cpp {VERSION}: building {', '.join(TARGETS)} with 2 jobs (several minutes; log in {base})")
    _run(["cmake", "--build", str(build), "--config", "Release", "-j2", "--target", *TARGETS],
         base / "build.log", log, progress=True)
    (build / MARKER).write_text(json.dumps(marker_content(VERSION, CMAKE_FLAGS), indent=1))
    found = binaries_in(build)
    log(f"llama.cpp {VERSION}: built {found.server} and {found.quantize}")
    return found


def _check_tools(allow_apt: bool, log: Callable[[str], None]) -> None:
    missing = [tool for tool in ("cmake", "g++", "make") if shutil.which(tool) is None]
    if not missing:
        return
    if not allow_apt or os.geteuid() != 0:
        raise RuntimeError(f"building llama.cpp needs {', '.join(missing)}; install them (cmake, g++, make)")
    log(f"installing {', '.join(missing)} with apt-get")
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", *missing], check=True, stdout=subprocess.DEVNULL)


def _sdist(root: Path, log: Callable[[str], None]) -> Path:
    """The cached sdist, downloaded from the package index with pip if it is not there yet."""
    folder = root / "llama-cpp-vocab"
    path = folder / SDIST
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading the llama-cpp-python {VERSION} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(folder)], check=True)
    return path


def _extract(sdist: Path, source: Path, log: Callable[[str], None]) -> None:
    """Unpack only vendor/llama.cpp of the sdist into `source`."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    log(f"extracting llama.cpp from {sdist}")
    staging = source.with_name(source.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix):]
                members.append(member)
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(source, ignore_errors=True)
    staging.rename(source)


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run(cmd: list[str], log_path: Path, log: Callable[[str], None], progress: bool = False) -> None:
    """Run a build step, its output to `log_path`; with `progress`, report each new tenth of the build."""
    shown = -10
    with log_path.open("w") as out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True) as proc:
        for line in proc.stdout:
            out.write(line)
            match = _PERCENT.match(line)
            if progress and match and int(match.group(1)) >= shown + 10:
                shown = int(match.group(1))
                log(f"  build {shown}%")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}); see {log_path}")
