"""Staying up and losing nothing: cancellation, the bounded queue (429), size and time limits (413, 408),
per-key rate limits, metrics, the per-request log line and graceful shutdown, against real servers."""

from __future__ import annotations

import concurrent.futures
import json
import select
import signal
import socket
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import (MODEL, body, post, read_until_closed, scrape, sse_events, validate_response,
                               wait_until_idle)

KEY = "sk-robustness-test-key-0123456789"
LONG = {"max_tokens": 120, "logit_bias": {"0": -100, "2": -100}}   # no early end: a few seconds of decoding


@pytest.fixture(scope="module")
def limited():
    """One request runs at a time and none may wait; small bodies, short body timeout, few prompts."""
    s = Server("--api-key", KEY, "--max-num-seqs", "1", "--max-queued-requests", "0", "--max-request-body", "64KiB",
               "--request-body-timeout", "2", "--request-header-timeout", "2", "--max-prompts-per-request", "4",
               "--max-sequences-per-request", "8",
               log_level="info")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(limited):
    with httpx.Client(base_url=limited.base, timeout=120, headers={"authorization": f"Bearer {KEY}"}) as c:
        yield c


def sdk(server: Server, retries: int, hook=None) -> openai.OpenAI:
    hooks = {"response": [validate_response]}
    if hook is not None:
        hooks["request"] = [hook]
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=retries,
                         http_client=httpx.Client(timeout=120, event_hooks=hooks))


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _refused(url: str) -> bool:
    """Whether the server no longer serves new requests: the connection is refused, or (caught while its
    listening socket closed) closed without an answer."""
    try:
        httpx.get(url, timeout=5)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return True
    except httpx.TimeoutException:
        return False
    return False


def test_a_full_queue_answers_429_with_retry_after_and_the_sdk_retries(limited, http):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, http, body(**LONG))
        wait_for(lambda: scrape(limited.base)["textcomplete_requests_in_flight"] == 1)

        refused = post(http, body())
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and set(error) == {"message", "type", "param", "code"}
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert all(f"x-ratelimit-{k}" in refused.headers for k in
                   ("limit-requests", "limit-tokens", "remaining-tokens", "reset-requests", "reset-tokens"))

        with pytest.raises(openai.RateLimitError):
            sdk(limited, retries=0).completions.create(model=MODEL, prompt="Hi", max_tokens=2)

        attempts = []
        patient = sdk(limited, retries=300, hook=attempts.append)   # Retry-After 1 s: up to minutes on a busy machine
        done = patient.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop")
        assert len(attempts) >= 2           # refused at least once, then served after Retry-After
        assert busy.result().status_code == 200
        assert busy.result().json()["usage"]["completion_tokens"] == LONG["max_tokens"]


def test_an_oversized_body_gets_413_and_is_not_retried(limited, http):
    big = body(prompt="word " * 20000)          # ~100 KB of JSON against a 64 KiB limit
    r = post(http, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    attempts = []
    with pytest.raises(openai.APIStatusError) as exc:
        sdk(limited, retries=2, hook=attempts.append).completions.create(model=MODEL, prompt="word " * 20000)
    assert exc.value.status_code == 413 and len(attempts) == 1
    assert http.get("/health").status_code == 200


def _read_response(sock: socket.socket) -> str:
    """Read one HTTP response whole: headers and body may arrive in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return (head + b"\r\n\r\n" + rest).decode()


def test_a_body_that_never_finishes_gets_408_and_frees_the_worker(limited, http):
    port = int(limited.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{\"model\": ")
        reply = _read_response(sock)
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert time.monotonic() - start < 30      # the 2 s deadline, not the 15 s socket timeout
        assert '"code":"request_timeout"' in reply.replace(" ", "")
    assert post(http, body(max_tokens=1)).status_code == 200


@pytest.mark.parametrize("trickle", [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: " + b"y" * 100])
def test_headers_that_never_finish_get_408_and_the_connection_closes(limited, http, trickle):
    """Slowloris: a silent connection, or a head sent a byte every 0.1 s, cannot hold the server."""
    port = int(limited.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        for byte in trickle:   # never the blank line that ends the head
            if select.select([sock], [], [], 0)[0]:
                break          # the server has answered
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break          # the server answered and closed: read what it said
            time.sleep(0.1)
        reply = read_until_closed(sock).decode()   # returns only because the server closes
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert 1.5 < time.monotonic() - start   # not before the 2 s deadline (and read_until_closed returned)
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert post(http, body(max_tokens=1)).status_code == 200


def test_prompt_and_sequence_counts_are_limited(http):
    r = post(http, body(prompt=["a", "b", "c", "d", "e"]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(http, body(prompt=["a", "b", "c"], n=3))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = post(http, body(prompt=["a", "b"], n=2, best_of=5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    assert post(http, body(prompt=["a", "b"], n=4, max_tokens=1)).status_code == 200


def test_a_client_leaving_a_non_streamed_request_aborts_it(limited):
    before = scrape(limited.base)
    with httpx.Client(base_url=limited.base, timeout=1.0, headers={"authorization": f"Bearer {KEY}"}) as quick:
        with pytest.raises(httpx.ReadTimeout):
            quick.post("/v1/completions", json=body(max_tokens=400, logit_bias={"0": -100, "2": -100}))
    after = wait_until_idle(limited.base, timeout=60)
    assert after["textcomplete_kv_blocks_used"] == 0 and after["textcomplete_requests_running"] == 0
    generated = after["textcomplete_generation_tokens_total"] - before["textcomplete_generation_tokens_total"]
    assert generated < 400                       # aborted, not run to its 400 tokens
    assert after.get("textcomplete_http_requests_total{path=/v1/completions,status=499}", 0) >= 1


def test_a_client_leaving_a_stream_aborts_it(limited, http):
    before = scrape(limited.base)
    with http.stream("POST", "/v1/completions", json=body(stream=True, **LONG)) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break
    after = wait_until_idle(limited.base, timeout=60)
    assert after["textcomplete_kv_blocks_used"] == 0 and after["textcomplete_requests_in_flight"] == 0
    generated = after["textcomplete_generation_tokens_total"] - before["textcomplete_generation_tokens_total"]
    assert generated < LONG["max_tokens"]        # aborted, not run to its end


def test_metrics_count_requests_tokens_and_latencies(limited, http):
    before = scrape(limited.base)
    r = post(http, body(max_tokens=6, prompt="The capital of France is"))
    usage = r.json()["usage"]
    after = scrape(limited.base)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    assert delta("textcomplete_http_requests_total{path=/v1/completions,status=200}") == 1
    assert delta("textcomplete_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("textcomplete_generation_tokens_total") == usage["completion_tokens"]
    assert delta("textcomplete_time_to_first_token_seconds_count") == 1
    assert delta("textcomplete_inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    assert delta("textcomplete_request_duration_seconds_count") == 1
    total = after["textcomplete_kv_blocks_total"]
    assert after["textcomplete_kv_blocks_used"] + after["textcomplete_kv_blocks_free"] == total
    for name in ("textcomplete_prefix_cache_hit_rate", "textcomplete_preemptions_total",
                 "textcomplete_requests_waiting"):
        assert name in after
    assert httpx.get(limited.base + "/metrics").headers["content-type"].startswith("text/plain")


def test_one_structured_log_line_per_request_without_the_key(limited, http):
    r = post(http, body(max_tokens=3, user="alice"))
    request_id = r.headers["x-request-id"]

    def mine() -> list[dict]:
        lines = [json.loads(line.split("textcomplete.access: ", 1)[1]) for line in
                 limited.log_path.read_text().splitlines() if "textcomplete.access: " in line]
        return [line for line in lines if line["request_id"] == request_id]
    wait_for(lambda: mine())          # written once the response is sent
    text = limited.log_path.read_text()
    assert len(mine()) == 1
    entry = mine()[0]
    assert entry["status"] == 200 and entry["model"] == MODEL and entry["user"] == "alice"
    assert entry["completion_tokens"] == 3 and entry["prompt_tokens"] > 0 and entry["latency_ms"] > 0
    assert entry["key_id"].startswith("key_")
    assert KEY not in text and KEY[:12] not in text


@pytest.fixture(scope="module")
def per_key():
    s = Server("--api-key", "sk-first-key-aaaaaaaaaaaa", "--api-key", "sk-second-key-bbbbbbbbbbbb",
               "--requests-per-minute", "2", "--tokens-per-minute", "1000")
    yield s
    s.stop()


def test_per_key_limits_count_each_key_apart(per_key):
    def call(key, **fields):
        return post(httpx.Client(base_url=per_key.base, timeout=60, headers={"authorization": f"Bearer {key}"}),
                    body(**{"max_tokens": 1, **fields}))
    first = [call("sk-first-key-aaaaaaaaaaaa") for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    assert first[1].headers["x-ratelimit-limit-requests"] == "2"
    assert first[1].headers["x-ratelimit-remaining-requests"] == "0"
    refused = call("sk-first-key-aaaaaaaaaaaa")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert call("sk-second-key-bbbbbbbbbbbb").status_code == 200      # another key, its own budget
    too_big = call("sk-second-key-bbbbbbbbbbbb", max_tokens=None)      # up to the 1024-token context: over 1000
    assert too_big.status_code == 429 and too_big.headers["x-should-retry"] == "false"


def test_sigterm_lets_in_flight_requests_finish_then_exits_0():
    server = Server("--shutdown-timeout", "60")
    try:
        with httpx.Client(base_url=server.base, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body(stream=True, max_tokens=60,
                                                               logit_bias={"0": -100, "2": -100})) as r:
                lines = r.iter_lines()
                next(lines)
                server.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: _refused(server.base + "/health"))   # no longer accepting
                rest = [line for line in lines]
            events = [line[len("data: "):] for line in rest if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()


def test_sigterm_aborts_what_outlives_the_deadline_and_exits_0():
    server = Server("--shutdown-timeout", "2")
    endless = body(max_tokens=900, logit_bias={"0": -100, "2": -100})   # ~10 s of decoding, past the deadline
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with httpx.Client(base_url=server.base, timeout=60) as c:
                long = pool.submit(c.post, "/v1/completions", json=endless)
                stream = pool.submit(c.post, "/v1/completions", json={**endless, "stream": True})
                # both under way: each has its first token (the stream has begun sending)
                wait_for(lambda: scrape(server.base)["textcomplete_time_to_first_token_seconds_count"] == 2, 120)
                start = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                assert server.proc.wait(timeout=60) == 0
                assert time.monotonic() - start < 30          # the 2 s deadline, not the 900 tokens
                answer = long.result()    # aborted, and told so in the error envelope
                validate_response(answer)
                assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_shutting_down"
                streamed = stream.result()   # the stream had begun: told so in-band, then properly ended
                validate_response(streamed)
                events = sse_events(streamed)
                assert events[-1] == "[DONE]" and len(events) > 2
                error = json.loads(events[-2])["error"]
                assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
                assert all("choices" in json.loads(e) for e in events[:-2])
    finally:
        server.stop()


def test_sse_of_a_stream_still_ends_with_done_after_a_queue_refusal(limited, http):
    """A refused stream is a plain 429 (no SSE begun), and the next stream is whole."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, http, body(max_tokens=60, logit_bias={"0": -100, "2": -100}))
        wait_for(lambda: scrape(limited.base)["textcomplete_requests_in_flight"] == 1)
        refused = post(http, body(stream=True))
        assert refused.status_code == 429 and refused.headers["content-type"].startswith("application/json")
        busy.result()
    r = post(http, body(stream=True))
    assert sse_events(r)[-1] == "[DONE]"
