"""Clients that leave at every point of a request: before their body, half-way through it, and after it
while the answer is computed (plain and streamed), 50 of each, among ordinary requests. Each is a client
disconnect (499 in the metrics, one access-log line, no traceback), never a 5xx, and frees what it held."""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, scrape, wait_until_idle

EACH = 50
LONG = {"max_tokens": 200, "logit_bias": {"0": -100, "2": -100}}   # busy for seconds unless aborted


@pytest.fixture(scope="module")
def server():
    s = Server(log_level="info")
    yield s
    s.stop()


def _head(port: int, length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def leave(port: int, kind: str, seed: int) -> str:
    """Open a connection, send part of a request (or all of it), and close without reading the answer."""
    rng = random.Random(seed)
    payload = json.dumps({"model": MODEL, "prompt": f"Story {seed}: once upon a time", "temperature": 0,
                          "stream": kind == "after body, streamed", **LONG}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if kind == "before body":
            sock.sendall(_head(port, len(payload)))
        elif kind == "during body":
            sock.sendall(_head(port, len(payload)) + payload[:len(payload) // 2])
        else:
            sock.sendall(_head(port, len(payload)) + payload)
            # stay a moment, so some leave while queued, others while running or streaming
            sock.settimeout(rng.uniform(0.0, 0.5))
            try:
                sock.recv(1)
            except (TimeoutError, socket.timeout):
                pass
    return kind


def ordinary(base: str, i: int) -> str:
    """A greedy request that stays (streamed when i is odd); returns its text."""
    fields = {"model": MODEL, "prompt": "The sky is", "max_tokens": 12, "temperature": 0,
              "logit_bias": {"0": -100, "2": -100}}
    with httpx.Client(base_url=base, timeout=300) as http:
        if i % 2:
            with http.stream("POST", "/v1/completions", json={**fields, "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            return "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
        r = http.post("/v1/completions", json=fields)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        return r.json()["choices"][0]["text"]


def test_clients_leaving_before_during_and_after_the_body_lose_nothing(server):
    port = int(server.base.rsplit(":", 1)[1])
    expected = ordinary(server.base, 0)   # alone
    before = scrape(server.base)
    kinds = ["before body", "during body", "after body", "after body, streamed"]
    plan = [kind for kind in kinds[:2] for _ in range(EACH)] + [kinds[2 + i % 2] for i in range(EACH)]
    random.Random(0).shuffle(plan)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        normal = [pool.submit(ordinary, server.base, i) for i in range(16)]
        left = [pool.submit(leave, port, kind, seed) for seed, kind in enumerate(plan)]
        assert sorted(f.result() for f in left) == sorted(plan)
        results = [f.result() for f in normal]
    assert results == [expected] * 16   # whole, and as alone: the leavers did not disturb them

    after = wait_until_idle(server.base, timeout=120)
    assert after["textcomplete_requests_running"] == 0 and after["textcomplete_requests_waiting"] == 0
    assert after["textcomplete_requests_in_flight"] == 0
    assert after["textcomplete_kv_blocks_used"] == 0
    assert after["textcomplete_kv_blocks_free"] == after["textcomplete_kv_blocks_total"]

    def delta(status: str) -> float:
        name = f"textcomplete_http_requests_total{{path=/v1/completions,status={status}}}"
        return after.get(name, 0) - before.get(name, 0)
    statuses = {k: v for k, v in after.items() if k.startswith("textcomplete_http_requests_total")}
    assert not any("status=5" in k for k in statuses), statuses
    assert delta("499") >= 2 * EACH, statuses          # every one that left before its body was whole
    assert delta("200") >= 16 and delta("499") + delta("200") == 16 + len(plan), statuses

    log = server.log_path.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    lines = [json.loads(line.split("textcomplete.access: ", 1)[1]) for line in log.splitlines()
             if "textcomplete.access: " in line]
    completions = [line for line in lines if line["path"] == "/v1/completions"]
    assert len(completions) == 1 + 16 + len(plan)      # one line per request, the reference's included
    assert sum(line["status"] == 499 for line in completions) == delta("499")
