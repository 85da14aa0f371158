"""Small helpers for driving the server over raw HTTP: JSON posts and SSE parsing."""

from __future__ import annotations

import json

import httpx

MODEL = "SmolLM2-135M-Instruct"


def body(**fields) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, **fields}


_VALIDATORS: dict = {}


def schema_validator(name: str):
    """A validator for one of the contract's definitions (the schema file is read once)."""
    if not _VALIDATORS:
        from jsonschema import Draft202012Validator

        from tests.e2e.conftest import SCHEMA_PATH
        doc = json.loads(SCHEMA_PATH.read_text())
        _VALIDATORS.update({k: Draft202012Validator(v) for k, v in doc["$defs"].items()})
    return _VALIDATORS[name]


def validate_response(response: httpx.Response) -> None:
    """Validate a completions, models or error response against the schema (streams: every chunk)."""
    response.read()
    path = response.request.url.path
    kind = response.headers.get("content-type", "")
    if response.status_code >= 400:
        schema_validator("ErrorResponse").validate(response.json())
    elif kind.startswith("text/event-stream"):
        for event in map(json.loads, sse_events(response)[:-1]):
            schema_validator("ErrorResponse" if "error" in event else "CreateCompletionStreamChunk").validate(event)
    elif path.endswith("/completions"):
        schema_validator("CreateCompletionResponseStrict").validate(response.json())
    elif path.endswith("/models"):
        schema_validator("ListModelsResponse").validate(response.json())
    elif "/models/" in path:
        kind = "DeleteModelResponse" if response.request.method == "DELETE" else "Model"
        schema_validator(kind).validate(response.json())


def post(http: httpx.Client, payload, **kw) -> httpx.Response:
    """POST /v1/completions; every response is validated against the contract's schema."""
    if isinstance(payload, (dict, list)) or payload is None:
        r = http.post("/v1/completions", json=payload, **kw)
    else:
        r = http.post("/v1/completions", content=payload, headers={"content-type": "application/json"}, **kw)
    validate_response(r)
    return r


def sse_events(response: httpx.Response) -> list[str]:
    """The data fields of each event, in order (the raw strings, '[DONE]' included)."""
    events, data = [], []
    for line in response.text.splitlines():
        if line == "":
            if data:
                events.append("\n".join(data))
                data = []
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        data.append(line[len("data: "):])
    assert not data, "the stream did not end with a blank line"
    return events


def stream_chunks(http: httpx.Client, payload: dict) -> list[dict]:
    r = post(http, payload)
    assert r.status_code == 200, r.text
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def joined_texts(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def assert_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def read_until_closed(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def raw_request(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are (for headers that HTTP libraries refuse to send); returns status, headers, body."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request)
        data = read_until_closed(sock)
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def raw_post(port: int, payload: bytes, extra_headers: str = "") -> tuple[int, dict, bytes]:
    return raw_request(port, (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                              f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                              f"{extra_headers}\r\n").encode() + payload)


def scrape(base_url: str) -> dict[str, float]:
    """GET /metrics as {"name{label=value,...}": value} (plain names for unlabelled samples)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(base_url + "/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def wait_until_idle(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a KV block; returns the last scrape."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base_url)
        idle = (m["textcomplete_requests_running"] == 0 and m["textcomplete_requests_waiting"] == 0
                and m["textcomplete_kv_blocks_used"] == 0 and m["textcomplete_requests_in_flight"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)
