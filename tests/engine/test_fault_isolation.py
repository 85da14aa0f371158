"""A fault inside one request's sampling fails that request alone; the rest of the batch is untouched."""

from __future__ import annotations

import asyncio

import pytest

from tests.engine.test_batching import mixed_params, random_prompts, tiny_engine, tokens_of
from textcomplete.engine.async_engine import AsyncEngine
from textcomplete.engine.sampler import Sampler

BROKEN_SEED = 4242   # the sampler below raises for requests with this seed


@pytest.fixture
def broken_sampling(monkeypatch):
    original = Sampler._apply_biases

    def apply_biases(logits, requests):
        if any(r.params.seed == BROKEN_SEED for r in requests):
            raise RuntimeError("sampling exploded")
        return original(logits, requests)
    monkeypatch.setattr(Sampler, "_apply_biases", staticmethod(apply_biases))


def test_one_failing_request_does_not_touch_its_batch(tiny_model_dir, broken_sampling):
    engine = tiny_engine(tiny_model_dir)
    prompts = random_prompts(6, seed=3)
    params = [mixed_params(i) for i in range(6)]
    expected = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]

    broken = mixed_params(0).__class__(max_tokens=8, temperature=1.0, seed=BROKEN_SEED)
    outputs = engine.generate([*prompts, prompts[0]], [*params, broken])
    assert [tokens_of(outs) for outs in outputs[:6]] == expected
    failed = outputs[6][-1]
    assert failed.finished and failed.finish_reason == "error" and "sampling exploded" in failed.error
    assert not engine.has_unfinished_requests()
    assert engine.allocator.num_used_blocks == 0


def test_the_async_engine_raises_in_the_failing_request_only(tiny_model_dir, broken_sampling):
    engine = AsyncEngine(tiny_engine(tiny_model_dir))
    try:
        prompts = random_prompts(3, seed=5)
        good = mixed_params(1)
        broken = good.__class__(max_tokens=8, temperature=1.0, seed=BROKEN_SEED)

        async def collect(rid, prompt, p):
            return [out async for out in engine.generate(rid, prompt, p)]

        async def main():
            return await asyncio.gather(collect("a", prompts[0], good), collect("bad", prompts[1], broken),
                                        collect("c", prompts[2], good), return_exceptions=True)
        a, bad, c = asyncio.run(main())
        assert isinstance(bad, RuntimeError) and "sampling exploded" in str(bad)
        assert a[-1].finished and c[-1].finished and a[-1].finish_reason != "error"
        assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0
    finally:
        engine.shutdown()
