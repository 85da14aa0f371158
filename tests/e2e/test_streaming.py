"""Streaming: SSE framing, chunk shape, usage chunk, and stream text equal to non-stream text (R40s-R45s)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.helpers import MODEL, assert_error, body, joined_texts, post, sse_events, stream_chunks


def test_r40s_framing_ends_with_done(http):
    r = post(http, body(stream=True))
    events = sse_events(r)
    assert events[-1] == "[DONE]" and r.text.endswith("data: [DONE]\n\n")


def test_r41s_every_event_is_json_data(http):
    r = post(http, body(stream=True, n=2, temperature=0.5, seed=1))
    for line in r.text.splitlines():
        assert line == "" or line.startswith("data: ")
    for event in sse_events(r)[:-1]:
        assert isinstance(json.loads(event), dict)


def test_r42s_chunks_share_id_created_model_and_finish_once(http, validate):
    chunks = stream_chunks(http, body(stream=True, prompt=["A", "B"], n=2, temperature=0.8, seed=4,
                                      logprobs=2, echo=True))
    for chunk in chunks:
        validate("chunk", chunk)
        assert "error" not in chunk
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    finishes = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["finish_reason"] is not None:
                assert choice["index"] not in finishes
                finishes[choice["index"]] = choice["finish_reason"]
    assert sorted(finishes) == [0, 1, 2, 3]


def test_r43s_usage_chunk_last(http, validate):
    chunks = stream_chunks(http, body(stream=True, stream_options={"include_usage": True}))
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"])
    validate("chunk", last)
    plain = stream_chunks(http, body(stream=True))
    assert all(c.get("usage") is None for c in plain)


def test_r44s_obfuscation_only_when_asked(http):
    on = stream_chunks(http, body(stream=True, stream_options={"include_obfuscation": True}))
    assert all(isinstance(c["obfuscation"], str) for c in on)
    off = stream_chunks(http, body(stream=True, stream_options={"include_obfuscation": False}))
    assert all("obfuscation" not in c for c in off)


def test_r45s_validation_errors_on_a_stream_are_plain_json(http, client):
    r = post(http, body(stream=True, temperature=9))
    assert_error(r, 400, param="temperature")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", stream=True, temperature=9)


@pytest.mark.parametrize("fields", [
    {}, {"n": 3, "temperature": 0}, {"prompt": ["Hello", "The sky is"], "n": 2},
    {"max_tokens": 30, "logit_bias": {"2": -100}}, {"echo": True, "logprobs": 2},
    {"logprobs": 3, "max_tokens": 12},
], ids=["plain", "n", "prompts-n", "long", "echo-logprobs", "logprobs"])
def test_stream_equals_non_stream_for_greedy(http, fields):
    payload = body(**fields)
    whole = post(http, payload).json()
    chunks = stream_chunks(http, {**payload, "stream": True})
    assert joined_texts(chunks) == {c["index"]: c["text"] for c in whole["choices"]}
    if payload.get("logprobs") is not None:
        merged: dict[int, dict] = {}
        for chunk in chunks:
            for choice in chunk["choices"]:
                m = merged.setdefault(choice["index"], {k: [] for k in choice["logprobs"]})
                for k, v in choice["logprobs"].items():
                    m[k].extend(v)
        assert merged == {c["index"]: c["logprobs"] for c in whole["choices"]}


def test_stream_equals_non_stream_with_stop_sequences(http):
    free = post(http, body(max_tokens=30, logit_bias={"2": -100})).json()["choices"][0]["text"]
    for stop in (free[5:9], free[10:12], "\n", "no such stop"):
        payload = body(max_tokens=30, logit_bias={"2": -100}, stop=[stop], logprobs=1)
        whole = post(http, payload).json()["choices"][0]
        chunks = stream_chunks(http, {**payload, "stream": True})
        assert joined_texts(chunks)[0] == whole["text"]
        tokens = [t for c in chunks for ch in c["choices"] for t in ch["logprobs"]["tokens"]]
        assert tokens == whole["logprobs"]["tokens"]


def test_official_sdk_stream(client):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


FAULT_USER = "textcomplete-test:inject-fault"


def test_r46s_error_after_the_stream_began_is_an_in_band_event(http, client):
    r = post(http, body(stream=True, user=FAULT_USER, max_tokens=8))
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    first, error = json.loads(events[0]), json.loads(events[-2])
    assert "error" not in first and first["choices"]
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=True, user=FAULT_USER):
            pass


def test_an_internal_fault_fails_its_request_alone(http, client):
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        healthy = pool.submit(post, http, body(max_tokens=24, logit_bias={"2": -100}))
        faulty = pool.submit(post, http, body(max_tokens=4, user=FAULT_USER))
        err = assert_error(faulty.result(), 500)
        assert err["type"] == "server_error"
        assert healthy.result().status_code == 200
        assert healthy.result().json()["usage"]["completion_tokens"] == 24
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, user=FAULT_USER)
    assert http.get("/health").status_code == 200
