"""A load generator for any OpenAI-compatible completions server: streamed requests at fixed concurrency.

Each request records when it was sent, when its first and last text arrived, and how many tokens it
produced; `Summary` turns a level's timings into throughput and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Timing:
    sent: float
    first: float | None          # first non-empty text
    last: float
    output_tokens: int
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency after the first token."""
        if self.first is None or self.output_tokens < 2:
            return None
        return (self.last - self.first) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True)
class Summary:
    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    output_tokens: int
    prompt_tokens: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @classmethod
    def of(cls, name: str, concurrency: int, timings: list[Timing], seconds: float) -> "Summary":
        ok = [t for t in timings if t.error is None]
        ttfts = [t.ttft for t in ok if t.ttft is not None]
        itls = [t.itl for t in ok if t.itl is not None]
        return cls(name, concurrency, len(ok), len(timings) - len(ok), seconds,
                   sum(t.output_tokens for t in ok), sum(t.prompt_tokens for t in ok),
                   percentile(ttfts, 0.5), percentile(ttfts, 0.99), percentile(itls, 0.5), percentile(itls, 0.99))


class LoadGenerator:
    def __init__(self, base_url: str, model: str, api_key: str = "bench", timeout: float = 1800) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.timeout = timeout

    async def _stream_one(self, client: httpx.AsyncClient, body: dict, expected_tokens: int) -> Timing:
        sent = time.perf_counter()
        first, last, chunks_text = None, sent, 0
        try:
            async with client.stream("POST", self.url, json={**body, "stream": True}, headers=self.headers) as r:
                if r.status_code != 200:
                    return Timing(sent, None, time.perf_counter(), 0, error=f"HTTP {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("error"):
                        return Timing(sent, first, time.perf_counter(), 0, error=str(chunk["error"]))
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks_text += 1
        except httpx.HTTPError as exc:
            return Timing(sent, None, time.perf_counter(), 0, error=type(exc).__name__)
        # Output length is forced (end-of-text is biased away), so every request yields max_tokens tokens.
        return Timing(sent, first, last, expected_tokens if first is not None else 0)

    async def _post_one(self, client: httpx.AsyncClient, body: dict, prompt_tokens: int) -> Timing:
        sent = time.perf_counter()
        try:
            r = await client.post(self.url, json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            return Timing(sent, None, time.perf_counter(), 0, error=type(exc).__name__)
        done = time.perf_counter()
        if r.status_code != 200:
            return Timing(sent, None, done, 0, error=f"HTTP {r.status_code}: {r.text[:200]}")
        return Timing(sent, done, done, 0, prompt_tokens=prompt_tokens)

    async def run_level(self, name: str, bodies: list[dict], concurrency: int, expected_tokens: int = 0,
                        stream: bool = True, prompt_tokens: int = 0) -> Summary:
        """Send every body, at most `concurrency` in flight; streamed unless `stream` is False."""
        gate = asyncio.Semaphore(concurrency)
        # A fresh connection per request: llama-server closes a connection after a streamed response, and a
        # reused one then fails at once (RemoteProtocolError); a loopback connect costs well under a millisecond.
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            with tqdm(total=len(bodies), desc=f"{name} c={concurrency}", leave=False) as bar:
                async def one(body: dict) -> Timing:
                    async with gate:
                        t = await (self._stream_one(client, body, expected_tokens) if stream
                                   else self._post_one(client, body, prompt_tokens))
                    bar.update()
                    return t
                start = time.perf_counter()
                timings = await asyncio.gather(*(one(b) for b in bodies))
                seconds = time.perf_counter() - start
        return Summary.of(name, concurrency, list(timings), seconds)

    def body(self, prompt: str | list, max_tokens: int, **fields) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields}
