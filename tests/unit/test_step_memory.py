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


def test_an_mlp_frees_its_gate_up_product_before_the_down_projection():
    """The gate/up product is the MLP's largest temporary (twice the intermediate width for every row of a
    prefill chunk): alive through the down-projection it would sit beside that projection's own input. Seen
    from the down-projection, no tensor the program holds may still share its memory."""
    import gc

    import torch.nn.functional as F

    from textcomplete.models.llama import LlamaMLP
    torch.manual_seed(0)
    mlp = LlamaMLP(8, 24, bias=False)
    gate, up, down = mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone(), mlp.down_proj.weight
    mlp.fuse()
    product: list[int] = []
    alive_at_down: list[bool] = []

    def holders(pointer: int) -> list[torch.Tensor]:
        return [o for o in gc.get_objects() if type(o) is torch.Tensor and o.untyped_storage().data_ptr() == pointer]

    mlp.gate_up_proj.register_forward_hook(lambda module, args, out: product.append(out.untyped_storage().data_ptr()))
    mlp.down_proj.register_forward_pre_hook(lambda module, args: alive_at_down.append(bool(holders(product[-1]))))
    x = torch.randn(5, 8)
    with torch.inference_mode():
        y = mlp(x)
    assert alive_at_down == [False]
    torch.testing.assert_close(y, F.linear(F.silu(x @ gate.T) * (x @ up.T), down))
