"""The async interface: concurrent submitters get their own outputs; leaving a stream aborts it."""

from __future__ import annotations

import asyncio

import pytest

from tests.engine.test_batching import mixed_params, random_prompts, tiny_engine, tokens_of
from textcomplete.engine.async_engine import AsyncEngine
from textcomplete.engine.sampling_params import SamplingParams


@pytest.fixture
def async_engine(tiny_model_dir):
    engine = AsyncEngine(tiny_engine(tiny_model_dir))
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, request_id: str, prompt, params):
    return [out async for out in engine.generate(request_id, prompt, params)]


def test_concurrent_streams_match_sequential_runs(async_engine):
    prompts = random_prompts(12, seed=11)
    params = [mixed_params(i) for i in range(12)]
    expected = [tokens_of(async_engine.engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]

    async def main():
        return await asyncio.gather(*(collect(async_engine, f"r{i}", p, sp)
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
    results = asyncio.run(main())
    assert [tokens_of(outs) for outs in results] == expected
    assert all(outs[-1].finished and sum(o.finished for o in outs) == 1 for outs in results)


def test_leaving_a_stream_early_aborts_and_frees_blocks(async_engine):
    engine = async_engine.engine

    async def main():
        stream = async_engine.generate("long", [5, 6, 7, 8], SamplingParams(max_tokens=400, ignore_eos=True))
        async for out in stream:
            if len(out.new_token_ids):
                break
        await stream.aclose()
        for _ in range(200):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_a_refused_request_raises_without_harming_others(async_engine):
    async def main():
        good = asyncio.create_task(collect(async_engine, "good", [5, 6, 7], SamplingParams(max_tokens=8)))
        with pytest.raises(ValueError, match="vocabulary"):
            await collect(async_engine, "bad", [10**9], SamplingParams(max_tokens=8))
        return await good
    outs = asyncio.run(main())
    assert outs[-1].finished


def test_fail_all_ends_every_request_with_its_own_error_and_frees_blocks(async_engine):
    endless = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        received: dict[str, int] = {}

        async def run(rid, prompt):
            received[rid] = 0
            async for _ in async_engine.generate(rid, prompt, endless):
                received[rid] += 1
        tasks = [asyncio.create_task(run(f"r{i}", p)) for i, p in enumerate(random_prompts(3, seed=4))]
        while len(received) < 3 or min(received.values()) < 2:   # all three are decoding
            await asyncio.sleep(0.01)
        async_engine.fail_all(lambda: ConnectionAbortedError("closing"))
        return await asyncio.gather(*tasks, return_exceptions=True), received
    errors, received = asyncio.run(main())
    assert all(isinstance(e, ConnectionAbortedError) for e in errors)
    assert len({id(e) for e in errors}) == 3          # one error object per caller
    assert max(received.values()) < 400
    stats = async_engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
