"""Property-based fuzzing of POST /v1/completions: thousands of generated bodies (wrong types, huge and
negative numbers, odd unicode, malformed JSON, deep nesting) get only 2xx or 4xx answers in the contract's
shapes, and the server stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, scrape, validate_response, wait_until_idle

FIELDS = ["model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
          "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
          "seed"]
FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server():
    # A short context and few sequences per request bound what any valid body can cost.
    s = Server("--max-model-len", "40", "--max-sequences-per-request", "6", "--max-prompts-per-request", "6")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(fuzz_server):
    with httpx.Client(base_url=fuzz_server.base, timeout=120) as c:
        yield c


odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=4),
    st.sampled_from(["", "\x00", "\u202e\u200b", "🦙" * 30, "\ufffd", "a" * 5000, "<|endoftext|>", "data: [DONE]\n\n"]),
)
numbers = st.one_of(
    st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 5, 128, 129, 10**9, 1e308, -0.0, 2**63, 2**64]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, odd_text),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(odd_text, inner, max_size=6)),
    max_leaves=25,
)
plausible = {
    "model": st.one_of(st.just(MODEL), odd_text),
    "prompt": st.one_of(odd_text, st.lists(odd_text, max_size=8),
                        st.lists(st.integers(-3, 50000), max_size=20),
                        st.lists(st.lists(st.integers(-3, 60000), max_size=6), max_size=7)),
    "max_tokens": st.integers(-3, 4),
    "temperature": st.one_of(st.floats(-1, 3), st.just(0)),
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 8),
    "best_of": st.integers(-1, 8),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": st.one_of(st.none(), st.integers(-1, 7)),
    "echo": st.booleans(),
    "stop": st.one_of(st.none(), odd_text, st.lists(odd_text, max_size=6)),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), odd_text), numbers, max_size=4),
    "seed": st.one_of(st.none(), st.integers(-2**64, 2**64)),
}


@st.composite
def bodies(draw):
    """Mostly-plausible request objects where any field may instead hold any JSON value."""
    chosen = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS)))
    body = {"model": MODEL, "max_tokens": 2}
    for name in chosen:
        wild = name not in plausible or draw(st.integers(0, 4)) == 0
        body[name] = draw(json_values if wild else plausible[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(odd_text)] = draw(json_values)    # unknown fields
    return body


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 200_000).map(lambda depth: b'{"prompt":' * depth),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1e999999}',
                     b'{"model": "x", "prompt": "\\ud800"}', b"\xff\xfe{", b'{"a":1,"a":2}', b"NaN", b"-Infinity"]),
)


def assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    assert response.status_code < 300 or 400 <= response.status_code < 500
    validate_response(response)     # errors are envelopes; completions, chunks and streams match the contract


@FUZZ
@given(body=bodies())
def test_generated_request_objects_get_2xx_or_4xx(http, body):
    assert_well_formed(http.post("/v1/completions", content=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=500)
@given(raw=raw_bodies)
def test_malformed_bodies_get_4xx_envelopes(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_well_formed(r)
    assert r.status_code >= 400 or raw.strip().startswith(b"{")


def test_the_server_is_healthy_and_idle_after_fuzzing(fuzz_server, http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    m = wait_until_idle(fuzz_server.base)
    assert m["textcomplete_kv_blocks_used"] == 0 and m["textcomplete_requests_in_flight"] == 0
    served = {k: v for k, v in scrape(fuzz_server.base).items() if k.startswith("textcomplete_http_requests_total")}
    assert not any("status=5" in k for k in served), served
