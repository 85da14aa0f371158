"""The native kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

The native decode tests (odd shapes, 1-token prompts, ragged batches, the last KV block, the quantized paths)
run again in a child process whose native modules are built instrumented (TEXTCOMPLETE_SANITIZE) and which
loads the ASan runtime first; any error the sanitizers find aborts that process. A tiny helper that reads
past the end of a tensor on purpose, built the same way, shows that the set-up really instruments the code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textcomplete.kernels import SANITIZE_ENV

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("native") / "oob_probe.cpp"
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


@pytest.fixture(scope="module")
def sanitized_env() -> dict[str, str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler}): the native kernels are not built on this machine")
    runtime = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(runtime) and os.path.exists(runtime), f"{compiler} has no AddressSanitizer runtime"
    # The C++ runtime too: ASan finds the real __cxa_throw when it starts, and Python loads libstdc++ only later
    # (with the first native module), so an exception thrown by the library without torch would abort ASan.
    cxx = subprocess.run([compiler, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    preload = f"{runtime} {cxx}" if os.path.isabs(cxx) and os.path.exists(cxx) else runtime
    return {**os.environ, SANITIZE_ENV: "address,undefined", "LD_PRELOAD": preload,
            # Python itself never frees some memory at exit: leaks are not what this looks for.
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
            "PYTHONPATH": str(ROOT)}


def run_python(code: str, env: dict[str, str], timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


PROBE_CODE = f"""
import sys, torch
from pathlib import Path
from textcomplete.kernels import build_extension
probe = build_extension("textcomplete_oob_probe", Path({str(PROBE)!r}))
print("built", probe.__file__, flush=True)
print("sum", probe.read_past_end(torch.ones(1000), int(sys.argv[1]) if len(sys.argv) > 1 else 0), flush=True)
"""


def test_the_sanitizer_build_catches_an_out_of_bounds_read(sanitized_env):
    in_bounds = run_python(PROBE_CODE, sanitized_env)
    assert in_bounds.returncode == 0, in_bounds.stderr[-3000:]
    assert "_sanitized" in in_bounds.stdout and "sum 1000.0" in in_bounds.stdout, in_bounds.stdout

    past = run_python(PROBE_CODE.replace("int(sys.argv[1]) if len(sys.argv) > 1 else 0", "8"), sanitized_env)
    assert past.returncode != 0, past.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in past.stderr, past.stderr[-3000:]
    assert "read_past_end" in past.stderr and "sum" not in past.stdout


KERNEL_TESTS = f"""
import sys, pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", {str(ROOT / "tests/engine/test_native_decode.py")!r}])
from textcomplete.kernels import decode_layers
print("module", decode_layers().__file__, flush=True)
sys.exit(int(code))
"""


def assert_passed_clean(code: str, env: dict[str, str], instrumented: str) -> None:
    """Runs a test session's code: every test passes, no sanitizer reports, and `instrumented` (the sanitized
    build's name) is what ran."""
    run = run_python(code, env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert not any(report in output for report in REPORTS), output[-5000:]
    assert instrumented in run.stdout, run.stdout[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


def test_the_native_decode_tests_pass_under_asan_and_ubsan(sanitized_env):
    assert_passed_clean(KERNEL_TESTS, sanitized_env, "textcomplete_decode_sanitized")


LIBRARY_TESTS = f"""
import sys, pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", {str(ROOT / "tests/engine/test_native_library.py")!r},
                    "-k", "every_step_kind or sliding_windows or refuses"])
from textcomplete.kernels import library
print("library", library.load().path, flush=True)
sys.exit(int(code))
"""


def test_the_native_layer_stack_tests_pass_under_asan_and_ubsan(sanitized_env):
    """The library without torch, instrumented: every step kind (decode rows, prompt chunks, both at once) over
    float32 weights and each cache type, sliding windows, and the refusals of what does not fit."""
    assert_passed_clean(LIBRARY_TESTS, sanitized_env, "libtextcomplete_native_sanitized")
