"""Building the native modules: a build killed half-way never blocks the next start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from textcomplete.kernels import decode_build_directory, decode_layers

ROOT = Path(__file__).resolve().parents[2]


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_one():
    assert decode_layers() is not None, "the native decode kernels did not build"
    stale = decode_build_directory() / "lock"
    stale.touch()   # what torch's build leaves behind when its process is killed mid-build
    code = ("from textcomplete.kernels import decode_layers; m = decode_layers(); "
            "assert m is not None; print('loaded', m.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]
    assert not stale.exists()
