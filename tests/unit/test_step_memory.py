"""Memory that a step frees is reused by the next steps, not unmapped and faulted in again; after a step of
prompt chunks the heap's free pages go back to the system."""

from __future__ import annotations

import resource

import pytest
import torch

from textcomplete.engine.engine import release_freed_memory, reuse_freed_memory

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


def _anonymous_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) // 1024


def test_released_memory_leaves_the_process_even_between_live_allocations():
    """A step's temporaries freed while small allocations made after each of them stay alive: the heap keeps
    the holes (no free pages at its top to trim) until they are released, and then they are not resident."""
    if not reuse_freed_memory():
        pytest.skip("the C library takes no glibc mallopt settings")
    temporaries, pins = [], []
    for _ in range(8):
        temporaries.append(torch.empty(8 * MIB // 4).fill_(1.0))
        pins.append(torch.ones(16))   # outlives the step, placed after the temporary
    del temporaries
    held = _anonymous_mib()
    assert release_freed_memory()
    assert held - _anonymous_mib() >= 48, (held, _anonymous_mib())
    assert all(float(pin.sum()) == 16.0 for pin in pins)


def test_steps_of_prompt_chunks_release_freed_memory_and_decode_steps_do_not(tiny_model_dir, monkeypatch):
    import textcomplete.engine.engine as engine_module
    from tests.engine.test_batching import tiny_engine
    from textcomplete.engine.sampling_params import SamplingParams

    engine = tiny_engine(tiny_model_dir)
    steps: list[list] = []   # [prompt tokens of the step, released after it], the flag set by the release
    release = engine_module.release_freed_memory
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: steps[-1].__setitem__(1, True) or release())
    schedule = engine.scheduler.schedule

    def recorded():
        out = schedule()
        steps.append([out.num_prompt_tokens, False])
        return out
    monkeypatch.setattr(engine.scheduler, "schedule", recorded)
    prompt = list(range(2, 2 + 150))   # three chunks of at most 64 tokens (tiny_engine's step budget)
    engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    prompt_steps = [released for tokens, released in steps if tokens >= engine_module.RELEASE_AFTER_PROMPT_TOKENS]
    decode_steps = [released for tokens, released in steps if tokens == 0]
    assert prompt_steps == [True, True] and len(decode_steps) == 5 and not any(decode_steps), steps
