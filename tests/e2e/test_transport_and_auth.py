"""Transport, URLs, headers and API keys (conformance R1-R9, R51)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.helpers import MODEL, assert_error, body, post, raw_post


def test_r1_paths_under_v1(http, client):
    assert post(http, body()).status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert http.get(f"/v1/models/{MODEL}").status_code == 200
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).object == "text_completion"


def test_r2_r3_json_in_json_out(http, validate):
    r = post(http, body())
    assert r.headers["content-type"].startswith("application/json")
    validate("response", r.json())


def test_r2_stream_regardless_of_accept_header(http):
    r = http.post("/v1/completions", json=body(stream=True), headers={"accept": "application/json"})
    assert r.headers["content-type"].startswith("text/event-stream")


def test_r4_stream_content_type(http):
    r = post(http, body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")


def test_r5_request_id_on_every_response(http, client):
    for r in (post(http, body()), post(http, b"{"), http.get("/v1/models"), http.get("/nope"),
              post(http, body(stream=True))):
        assert r.headers.get("x-request-id")
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert completion._request_id
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=-1)
    assert info.value.request_id


def test_r6_client_headers_are_tolerated(http):
    headers = {"Authorization": "Bearer anything", "OpenAI-Organization": "org-x", "OpenAI-Project": "proj-x",
               "User-Agent": "OpenAI/Python 3.54.0", "X-Stainless-Lang": "python", "X-Stainless-Retry-Count": "0",
               "X-Stainless-Read-Timeout": "600", "X-Stainless-Async": "false",
               "X-OpenAI-Client-User-Agent": "{\"bindings_version\": \"0.28.1\"}"}
    assert http.post("/v1/completions", json=body(), headers=headers).status_code == 200


def test_r51_unknown_url_is_a_404_envelope(http, validate):
    r = http.post("/v1/chat/completionz", json={})
    err = assert_error(r, 404)
    assert "Invalid URL (POST /v1/chat/completionz)" in err["message"]
    validate("error", r.json())
    assert_error(http.get("/v1/completions"), 404)


@pytest.fixture(scope="module")
def keyed_server():
    s = Server("--api-key", "sk-first-key-123456", env={"TEXTCOMPLETE_API_KEYS": "sk-second-key-abcdef"})
    yield s
    s.stop()


def test_r7_missing_key_is_401(keyed_server, validate):
    for headers in ({}, {"Authorization": "Bearer"}):
        r = httpx.post(keyed_server.base + "/v1/completions", json=body(), headers=headers)
        err = assert_error(r, 401, param=None, code=None)
        assert err["message"].startswith("You didn't provide an API key")
        assert err["type"] == "invalid_request_error"
        validate("error", r.json())
    # lm-eval sends "Bearer " with an empty key; HTTP libraries refuse to, so send the bytes by hand.
    status, headers, payload = raw_post(keyed_server.port, json.dumps(body()).encode(), "Authorization: Bearer \r\n")
    assert status == 401 and json.loads(payload)["error"]["message"].startswith("You didn't provide an API key")


def test_r8_wrong_key_is_401_masked(keyed_server):
    key = "sk-wrong-key-0123456789"
    r = httpx.post(keyed_server.base + "/v1/completions", json=body(), headers={"Authorization": f"Bearer {key}"})
    err = assert_error(r, 401, param=None, code="invalid_api_key")
    assert key not in err["message"] and "Incorrect API key provided: sk-wr" in err["message"]
    assert err["message"].endswith("6789. You can find your API key at "
                                   "https://platform.openai.com/account/api-keys.")
    c = openai.OpenAI(base_url=keyed_server.base + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_r8_keys_from_flag_and_environment_both_work(keyed_server):
    for key in ("sk-first-key-123456", "sk-second-key-abcdef"):
        c = openai.OpenAI(base_url=keyed_server.base + "/v1", api_key=key, max_retries=0)
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices
    assert httpx.get(keyed_server.base + "/health").status_code == 200


def test_r9_open_server_accepts_any_or_no_bearer(http, server):
    assert http.post("/v1/completions", json=body(), headers={"Authorization": "Bearer whatever"}).status_code == 200
    assert httpx.post(str(http.base_url) + "/v1/completions", json=body(), timeout=120).status_code == 200
    status, _, _ = raw_post(server.port, json.dumps(body()).encode(), "Authorization: Bearer \r\n")
    assert status == 200


def test_r54_rate_limit_headers_on_every_response(http):
    names = ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
             "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]
    for r in (post(http, body()), post(http, b"{"), http.get("/v1/models"), post(http, body(stream=True))):
        assert all(n in r.headers for n in names)
        assert int(r.headers["x-ratelimit-remaining-requests"]) <= int(r.headers["x-ratelimit-limit-requests"])
        assert r.headers["x-ratelimit-reset-tokens"].endswith("s")
