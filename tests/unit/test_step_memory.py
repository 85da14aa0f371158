"""Memory that a step frees is reused by the next steps, not unmapped and faulted in again."""

from __future__ import annotations

import resource

import pytest
import torch

from textcomplete.engine.engine import reuse_freed_memory

MIB = 1 << 20
# A step's temporaries, alive together: some above the largest mmap threshold glibc adapts to by itself (32 MiB).
STEP_TENSORS_MIB = (8, 40, 24, 64, 16)


def _faults_of_a_step() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(n * MIB // 4).fill_(1.0) for n in STEP_TENSORS_MIB]
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_the_temporaries_of_repeated_steps_stop_faulting_pages_in():
    if not reuse_freed_memory():
        pytest.skip("the C library takes no glibc mallopt settings")
    pages = sum(STEP_TENSORS_MIB) * MIB // resource.getpagesize()
    faults = [_faults_of_a_step() for _ in range(8)]   # the heap grows to hold a step in the first few
    assert sum(faults[4:]) < pages // 10, (faults, pages)
