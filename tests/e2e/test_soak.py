"""A bounded soak: 500 mixed requests at concurrency 64, a quarter of them disconnecting at random points.

Every request that stays connected completes with the same text it gets alone; afterwards nothing runs,
every KV block is free (read from /metrics), and resident memory is within 10% of after a warm-up run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, schema_validator, wait_until_idle

REQUESTS, CONCURRENCY, WARMUP = 500, 64, 64
STORY = "The lighthouse keeper counted the ships that passed each night, and"
TEMPLATES = [
    {"prompt": "Once upon a time", "max_tokens": 8},
    {"prompt": STORY, "max_tokens": 10, "stream": True},
    {"prompt": "The capital of France is", "max_tokens": 6, "n": 2},
    {"prompt": "List three colors:", "max_tokens": 8, "best_of": 3, "n": 1, "temperature": 0.8, "seed": 7},
    {"prompt": "Water boils at", "max_tokens": 3, "echo": True, "logprobs": 2},
    {"prompt": "Count: one, two,", "max_tokens": 12, "stop": [","], "stream": True},
    {"prompt": ["Dogs are", "Cats are", "Birds are"], "max_tokens": 5},
    {"prompt": STORY, "max_tokens": 6, "logprobs": 1, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": [[1, 2, 3, 4, 5]], "max_tokens": 4, "n": 3, "temperature": 1.0, "seed": 11},
    {"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 0},
]


def full_body(template: dict) -> dict:
    return {"model": MODEL, "temperature": 0, **template}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def run_one(client: httpx.AsyncClient, body: dict) -> dict:
    """Texts by choice index and the usage, from a streamed or a plain response (validated)."""
    if body.get("stream"):
        texts: dict[int, str] = {}
        usage = None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in map(json.loads, events[:-1]):
            schema_validator("CreateCompletionStreamChunk").validate(event)
            for c in event["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            usage = event.get("usage") or usage
        return {"texts": texts, "usage": usage}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    schema_validator("CreateCompletionResponseStrict").validate(data)
    return {"texts": {c["index"]: c["text"] for c in data["choices"]}, "usage": data["usage"]}


async def disconnecting(client: httpx.AsyncClient, body: dict, rng: random.Random) -> str:
    """Leave mid-way: a stream after a few events, a plain request after a random wait."""
    if body.get("stream"):
        async with client.stream("POST", "/v1/completions", json=body) as r:
            wanted = rng.randint(1, 4)
            async for n, _ in _enumerate(r.aiter_lines()):
                if n >= wanted:
                    return "left"
        return "finished first"
    try:
        await asyncio.wait_for(client.post("/v1/completions", json=body), timeout=rng.uniform(0.02, 0.8))
    except asyncio.TimeoutError:
        return "left"
    return "finished first"


async def _enumerate(items):
    n = 0
    async for item in items:
        yield n, item
        n += 1


async def soak(base: str, count: int, seed: int, expected: dict[int, dict] | None) -> Counter:
    rng = random.Random(seed)
    plan = [(rng.randrange(len(TEMPLATES)), rng.random() < 0.25) for _ in range(count)]
    gate = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter = Counter()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    # Generous: on a machine whose cores are busy with other work, a queued request may wait minutes.
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def one(i: int, template: int, leave: bool) -> None:
            async with gate:
                body = full_body(TEMPLATES[template])
                if leave:
                    outcomes[await disconnecting(client, body, random.Random(seed * 1000 + i))] += 1
                    return
                got = await run_one(client, body)
                if expected is not None:
                    assert got["texts"] == expected[template]["texts"], (template, got, expected[template])
                    if got["usage"] is not None and expected[template]["usage"] is not None:
                        assert got["usage"]["completion_tokens"] == expected[template]["usage"]["completion_tokens"]
                outcomes["completed"] += 1
        await asyncio.gather(*(one(i, t, leave) for i, (t, leave) in enumerate(plan)))
    return outcomes


KV_CACHE_MIB = 256


@pytest.fixture(scope="module")
def soak_server():
    s = Server("--max-model-len", "256", "--kv-cache-memory", f"{KV_CACHE_MIB}MiB")
    yield s
    s.stop()


def test_500_mixed_requests_at_concurrency_64_lose_nothing(soak_server):
    base = soak_server.base

    async def references():
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            return {i: await run_one(client, full_body(t)) for i, t in enumerate(TEMPLATES)}
    expected = asyncio.run(references())     # each request alone

    asyncio.run(soak(base, WARMUP, seed=1, expected=expected))
    wait_until_idle(base, timeout=120)
    warm_rss = rss_bytes(soak_server.proc.pid)

    start = time.monotonic()
    outcomes = asyncio.run(soak(base, REQUESTS, seed=2, expected=expected))
    elapsed = time.monotonic() - start
    assert sum(outcomes.values()) == REQUESTS
    assert outcomes["left"] >= REQUESTS // 8         # about a quarter were planned to leave mid-way

    after = wait_until_idle(base, timeout=120)
    assert after["textcomplete_requests_running"] == 0 and after["textcomplete_requests_waiting"] == 0
    assert after["textcomplete_requests_in_flight"] == 0
    assert after["textcomplete_kv_blocks_used"] == 0
    assert after["textcomplete_kv_blocks_free"] == after["textcomplete_kv_blocks_total"]
    final_rss = rss_bytes(soak_server.proc.pid)
    # The KV cache's pages become resident as blocks are first written, so the soak may fault in the part of
    # it that the warm-up left untouched; anything beyond that is a leak.
    assert final_rss - warm_rss <= 0.10 * warm_rss + (KV_CACHE_MIB << 20), (warm_rss, final_rss)
    assert warm_rss - final_rss <= 0.10 * warm_rss, (warm_rss, final_rss)
    statuses = {k: v for k, v in after.items() if k.startswith("textcomplete_http_requests_total")}
    assert not any("status=5" in k for k in statuses), statuses
    print(f"soak: {dict(outcomes)} in {elapsed:.1f}s; RSS {warm_rss / 2**20:.0f} -> {final_rss / 2**20:.0f} MiB")
    assert httpx.get(base + "/health").status_code == 200
