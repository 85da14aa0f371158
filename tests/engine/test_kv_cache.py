"""The KV cache: its budget follows the machine, it is resident only as requests fill it, and a 16-bit cache
(--kv-cache-dtype) halves its memory for a small, bounded change in log-probabilities."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engine.test_batching import mixed_params, random_prompts, tiny_engine, tokens_of
from tests.engine.test_native_decode import native_calls  # noqa: F401 - a fixture
from textcomplete.engine.engine import default_kv_memory
from textcomplete.engine.engine import kv_bytes_per_block
from textcomplete.engine.sampling_params import SamplingParams


def test_the_default_budget_is_a_quarter_of_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   16000000 kB\n")
    assert default_kv_memory(meminfo) == 16000000 * 1024 // 4
    meminfo.write_text("MemAvailable:      10000 kB\n")
    assert default_kv_memory(meminfo) == 64 << 20             # a floor for a machine under pressure
    assert default_kv_memory(tmp_path / "absent") == 2 << 30  # no /proc: a fixed budget


def resident_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_cache_is_resident_only_as_it_fills(tiny_model_dir):
    tiny_engine(tiny_model_dir)   # the model and the kernels are loaded once before measuring
    before = resident_bytes()
    engine = tiny_engine(tiny_model_dir, kv_cache_memory=1 << 30)
    allocated = sum(layer.self_attn.attn.kv_cache.nbytes for layer in engine.loaded.model.model.layers)
    assert allocated >= (1 << 30) * 0.99
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert resident_bytes() - before < allocated / 8, "the whole KV cache became resident at start"


def mapping_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_cache_asks_for_small_pages(tiny_model_dir):
    """A huge page's first write stalls the step that makes it (the kernel clears 2 MiB, compacting memory
    first if it must): the cache's mappings are advised against them ("nh")."""
    engine = tiny_engine(tiny_model_dir, kv_cache_memory=256 << 20)
    caches = [layer.self_attn.attn.kv_cache for layer in engine.loaded.model.model.layers]
    for cache in caches:
        assert "nh" in mapping_flags(cache.data_ptr()), "a KV cache mapping may take huge pages"
        assert mapping_flags(cache.data_ptr() + cache.nbytes - 1) == mapping_flags(cache.data_ptr())
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert all(cache.float().abs().sum() > 0 for cache in caches), "the requests did not reach the cache"


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_a_16_bit_cache_halves_memory_and_stays_close(tiny_model_dir, native_calls, kv_dtype):
    memory = 64 * kv_bytes_per_block(tiny_engine(tiny_model_dir).spec, 16, 4)
    full = tiny_engine(tiny_model_dir, kv_cache_memory=memory, enable_prefix_caching=False)
    half = tiny_engine(tiny_model_dir, kv_cache_memory=memory, kv_cache_dtype=kv_dtype, enable_prefix_caching=False)
    plain = tiny_engine(tiny_model_dir, kv_cache_memory=memory, kv_cache_dtype=kv_dtype, native_decode=False,
                        enable_prefix_caching=False)
    assert half.allocator.num_blocks == 2 * full.allocator.num_blocks
    assert half.fingerprint != full.fingerprint
    prompts = random_prompts(6, seed=2, low=20, high=80)
    params = [dataclasses.replace(mixed_params(0), max_tokens=12, logprobs=2, prompt_logprobs=0)] * 6
    outs = {name: e.generate(prompts, params) for name, e in (("full", full), ("half", half), ("plain", plain))}
    assert native_calls, "decode steps never reached the native layers"

    def logprobs(name: str, kind: str) -> torch.Tensor:
        return torch.tensor([e.logprob for request in outs[name] for o in request for e in getattr(o, kind)
                             if e.logprob is not None])
    # The native layers and the PyTorch path round to the same 16-bit cache. Their float32 keys and values differ
    # by summation order alone, but where one lies near a rounding boundary of the cache's type the two round it
    # a step apart, so the bound is half that type's epsilon (measured: 6e-5 float16, 2.2e-4 bfloat16; a float32
    # cache, 5e-6), far below what a wrong conversion or layout gives.
    assert [tokens_of(o) for o in outs["half"]] == [tokens_of(o) for o in outs["plain"]]
    atol = torch.finfo(getattr(torch, kv_dtype)).eps / 2
    torch.testing.assert_close(logprobs("half", "logprobs"), logprobs("plain", "logprobs"), atol=atol, rtol=2e-5)
    # Against float32: prompt positions see the same tokens, so their log-probabilities compare one to one.
    drift = (logprobs("half", "prompt_logprobs") - logprobs("full", "prompt_logprobs")).abs()
    assert drift.mean() < 0.02 and drift.max() < 0.2, (drift.mean(), drift.max())
