"""A burst of the largest requests the limits allow, against a small KV cache: admission counts the KV tokens
each request can need, so the server answers each with a result, a 429 (retry later) or a 400 (too large for
this server at all), and its resident memory stays bounded (read from /proc), with no swapping or OOM kill."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, validate_response, wait_until_idle
from tests.e2e.test_soak import rss_bytes

KV = 16 << 20            # 352 tokens of SmolLM2's float32 cache; 4 x 352 = 1408 may be claimed in flight
SLACK = 256 << 20        # activations, logits of a step, the answers being built
PROMPTS = [[(7 * i + j) % 40000 + 100 for j in range(160)] for i in range(8)]
SCORING = {"prompt": PROMPTS, "max_tokens": 16, "echo": True, "logprobs": 5}   # 8 x 176 = 1408 tokens
TOO_LARGE = [{"prompt": [[5]] * 1024, "max_tokens": 200, "logprobs": 5},      # 1024 sequences
             {"prompt": "Hi", "n": 128, "max_tokens": 100},                     # n
             {"prompt": "Hi", "n": 6, "max_tokens": None}]                       # up to the context, six times


@pytest.fixture(scope="module")
def server():
    s = Server("--kv-cache-memory", "16MiB", "--max-model-len", "256")
    yield s
    s.stop()


def post(base: str, fields: dict) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=600) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **fields})
        validate_response(r)
        return r


def test_a_burst_of_the_largest_requests_stays_within_memory(server):
    pid = server.proc.pid
    assert post(server.base, SCORING).status_code == 200   # warm up: the largest step's buffers exist
    warm = rss_bytes(pid)
    peak, done = [warm], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    burst = [SCORING] * 6 + TOO_LARGE * 3 + [{"prompt": "Hi", "n": 16, "max_tokens": 60, "logprobs": 5}] * 3
    try:
        with concurrent.futures.ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda fields: post(server.base, fields), burst))
    finally:
        done.set()
        sampler.join()
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 400, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for fields, r in zip(burst, answers):
        if fields in TOO_LARGE:
            assert r.status_code == 400 and "too large for this server" in r.json()["error"]["message"], r.text
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    assert peak[0] - warm <= KV + SLACK, (warm >> 20, peak[0] >> 20)
    after = wait_until_idle(server.base, timeout=60)
    assert after["textcomplete_kv_blocks_used"] == 0 and after["textcomplete_requests_in_flight"] == 0
    print(f"burst: {sorted(statuses)}; RSS {warm >> 20} MiB, peak {peak[0] >> 20} MiB")
