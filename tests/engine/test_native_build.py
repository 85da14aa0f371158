"""Building the native modules: a build killed half-way never blocks the next start, and two checkouts of the
same code do not share (and so rebuild in turn) one cache entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from textcomplete.kernels import build_directory, decode_build_directory, decode_layers

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


def test_the_same_sources_at_another_path_get_their_own_cache_entry(tmp_path):
    """torch's build file records the source's path: a second checkout sharing the first one's entry would
    rebuild it, and the first would then rebuild it back."""
    source = ROOT / "textcomplete" / "kernels" / "decode.cpp"
    copy = tmp_path / "decode.cpp"
    copy.write_bytes(source.read_bytes())
    assert build_directory("textcomplete_decode", source) == build_directory("textcomplete_decode", source)
    assert build_directory("textcomplete_decode", copy) != build_directory("textcomplete_decode", source)
