"""Memory that a step frees is reused by the next step, not unmapped and faulted in again."""

from __future__ import annotations

import resource

import pytest
import torch

from textcomplete.engine.engine import reuse_freed_memory

SIZE = 96 << 20   # above the largest mmap threshold glibc adapts to by itself (32 MiB)


def _faults_of_filling(size: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(size // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_step_sized_buffer_is_reused_without_page_faults():
    if not reuse_freed_memory():
        pytest.skip("the C library takes no glibc mallopt settings")
    pages = SIZE // resource.getpagesize()
    _faults_of_filling(SIZE)   # the heap grows to hold it once
    assert _faults_of_filling(SIZE) < pages // 10
