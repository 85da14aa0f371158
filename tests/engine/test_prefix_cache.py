"""Prefix caching: exact cached-token counts, identical results on hit and miss, LRU eviction under pressure."""

from __future__ import annotations

import random

from tests.engine.test_batching import tiny_engine, tokens_of
from tests.tiny_models import VOCAB
from textcomplete.engine.engine import kv_bytes_per_block
from textcomplete.engine.sampling_params import SamplingParams

BLOCK = 16


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, VOCAB) for _ in range(n)]


def run(engine, prompt, params):
    [outs] = engine.generate([prompt], params)
    return outs


def test_cached_tokens_exact_for_three_blocks_plus_a_partial_one(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prefix = ids(3 * BLOCK + 5, seed=1)                      # 3 full blocks and 5 tokens of a 4th
    first = run(engine, prefix + ids(7, seed=2), SamplingParams(max_tokens=4, temperature=0.0))
    assert first[-1].num_cached_tokens == 0
    second = run(engine, prefix + ids(9, seed=3), SamplingParams(max_tokens=4, temperature=0.0))
    assert second[-1].num_cached_tokens == 3 * BLOCK


def test_outputs_identical_on_hit_and_miss(tiny_model_dir):
    cached = tiny_engine(tiny_model_dir)
    uncached = tiny_engine(tiny_model_dir, enable_prefix_caching=False)
    prefix = ids(70, seed=4)
    cached_run = run(cached, prefix + [5], SamplingParams(max_tokens=2))  # warm the cache
    assert cached_run[-1].num_cached_tokens == 0
    for i, params in enumerate([SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                                SamplingParams(max_tokens=20, temperature=0.9, seed=42, ignore_eos=True)]):
        prompt = prefix + ids(6, seed=10 + i)
        hit, miss = run(cached, prompt, params), run(uncached, prompt, params)
        assert hit[-1].num_cached_tokens == 64 and miss[-1].num_cached_tokens == 0
        assert tokens_of(hit) == tokens_of(miss)


def test_echo_logprobs_identical_on_hit_and_miss(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prompt = ids(50, seed=5)
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    first, second = run(engine, prompt, params), run(engine, prompt, params)
    entries = [[e for o in outs for e in o.prompt_logprobs] for outs in (first, second)]
    assert len(entries[0]) == len(prompt) - 1 and entries[0] == entries[1]
    # A request without prompt logprobs after them does hit the cache they filled.
    assert run(engine, prompt, SamplingParams(max_tokens=1))[-1].num_cached_tokens == 48


def test_a_whole_cached_prompt_still_computes_its_last_token(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prompt = ids(2 * BLOCK, seed=6)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    first, second = run(engine, prompt, params), run(engine, prompt, params)
    assert second[-1].num_cached_tokens == BLOCK          # the second block holds the last prompt token
    assert tokens_of(first) == tokens_of(second)


def test_eviction_under_memory_pressure(tiny_model_dir):
    probe = tiny_engine(tiny_model_dir)
    per_block = kv_bytes_per_block(probe.spec, BLOCK, probe.loaded.dtype.itemsize)
    engine = tiny_engine(tiny_model_dir, kv_cache_memory=12 * per_block)   # 12 blocks = 192 tokens
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [ids(60, seed=100 + i) for i in range(10)]
    expected = [tokens_of(run(probe, p, params)) for p in prompts]
    for _ in range(2):
        assert [tokens_of(run(engine, p, params)) for p in prompts] == expected
    assert engine.allocator.num_evictions > 0
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    # The most recent prompt is still cached; the oldest was evicted.
    assert run(engine, prompts[-1], params)[-1].num_cached_tokens == 48
    assert run(engine, prompts[0], params)[-1].num_cached_tokens == 0


def test_concurrent_requests_share_blocks_and_return_them(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=64)
    prefix = ids(64, seed=7)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = [tokens_of(run(tiny_engine(tiny_model_dir, enable_prefix_caching=False), prefix + [9 + i], params))
             for i in range(6)]
    outs = engine.generate([prefix + [9 + i] for i in range(6)], params)
    assert [tokens_of(o) for o in outs] == alone
    assert sum(o[-1].num_cached_tokens for o in outs) > 0
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert all(c == 0 for c in engine.allocator.ref_counts)
