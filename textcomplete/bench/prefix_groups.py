"""The prefix-groups workload: several long prefixes, each shared by a few requests, arriving shuffled.

It is what routing by prefix is for (system prompts or few-shot examples shared by some requests, not all):
time to first token per request, the share of prompt tokens each response says came from the cache
(`usage.prompt_tokens_details.cached_tokens`), and the server's own hit rate from `/metrics` when it has one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from textcomplete.bench.loadgen import percentile
from textcomplete.bench.workloads import PromptMaker, eos_bias
from textcomplete.tokenizer import Tokenizer

_HIT, _QUERIED = "textcomplete_prefix_cache_hit_tokens_total", "textcomplete_prefix_cache_queried_tokens_total"


@dataclass(frozen=True)
class PrefixGroupsConfig:
    groups: int = 12
    requests_per_group: int = 6
    prefix_tokens: int = 512
    suffix_tokens: int = 16
    concurrency: int = 4
    seed: int = 0


@dataclass(frozen=True)
class PrefixGroupsResult:
    config: PrefixGroupsConfig
    requests: int
    errors: int
    seconds: float
    ttft_p50: float
    ttft_p99: float
    prompt_tokens: int
    cached_tokens: int
    server_hit_rate: float | None     # from /metrics; None when the server has no such counters

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def format(self) -> str:
        c = self.config
        server = "n/a" if self.server_hit_rate is None else f"{self.server_hit_rate:.1%}"
        return (f"prefix groups: {c.groups} prefixes of {c.prefix_tokens} tokens x {c.requests_per_group} requests, "
                f"concurrency {c.concurrency}: {self.requests} ok, {self.errors} errors in {self.seconds:.1f} s; "
                f"cached prompt tokens {self.cached_share:.1%} (usage), server hit rate {server}; "
                f"TTFT p50 {self.ttft_p50:.3f} s, p99 {self.ttft_p99:.3f} s")


def _bodies(model: str, tokenizer: Tokenizer, config: PrefixGroupsConfig) -> list[dict]:
    prompts = PromptMaker(tokenizer, config.seed)
    prefixes = [prompts.text(config.prefix_tokens) for _ in range(config.groups)]
    bodies = [{"model": model, "prompt": p + " " + prompts.text(config.suffix_tokens), "max_tokens": 1,
               "temperature": 0, "logit_bias": eos_bias(tokenizer), "stream": True,
               "stream_options": {"include_usage": True}}
              for p in prefixes for _ in range(config.requests_per_group)]
    random.Random(config.seed).shuffle(bodies)
    return bodies


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float | None, dict | None]:
    """(time to first text, usage) of one streamed request; (None, None) if it failed."""
    sent, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                return None, None
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - sent
            usage = chunk.get("usage") or usage
    return first, usage


async def _scrape(client: httpx.AsyncClient, metrics_url: str) -> dict[str, float]:
    try:
        r = await client.get(metrics_url)
    except httpx.HTTPError:
        return {}
    values = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        name, _, value = line.partition(" ")
        if name in (_HIT, _QUERIED):
            values[name] = float(value)
    return values


async def run_async(base_url: str, model: str, api_key: str, tokenizer: Tokenizer,
                    config: PrefixGroupsConfig) -> PrefixGroupsResult:
    url = base_url.rstrip("/") + "/completions"
    metrics_url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
    gate = asyncio.Semaphore(config.concurrency)
    async with httpx.AsyncClient(timeout=1800, headers={"Authorization": f"Bearer {api_key}"}) as client:
        before = await _scrape(client, metrics_url)

        async def limited(body: dict):
            async with gate:
                return await _one(client, url, body)
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(b) for b in _bodies(model, tokenizer, config)))
        seconds = time.perf_counter() - start
        after = await _scrape(client, metrics_url)
    ok = [(t, u) for t, u in results if t is not None and u is not None]
    ttfts = [t for t, _ in ok]
    hit_rate = None
    if _QUERIED in before and _QUERIED in after and after[_QUERIED] > before[_QUERIED]:
        hit_rate = (after[_HIT] - before[_HIT]) / (after[_QUERIED] - before[_QUERIED])
    return PrefixGroupsResult(config, len(ok), len(results) - len(ok), seconds, percentile(ttfts, 0.5),
                              percentile(ttfts, 0.99), sum(u["prompt_tokens"] for _, u in ok),
                              sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for _, u in ok),
                              hit_rate)


def run(base_url: str, model: str, api_key: str, tokenizer: Tokenizer,
        config: PrefixGroupsConfig) -> PrefixGroupsResult:
    return asyncio.run(run_async(base_url, model, api_key, tokenizer, config))
