"""The ASGI app: routes, API keys, request ids, SSE framing and the mapping of every failure to an envelope.

Semantics live in `serving.py`; this module only moves JSON and bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from textcomplete.api.errors import APIError, invalid, model_not_found, server_error
from textcomplete.api.metrics import CONTENT_TYPE, Metrics
from textcomplete.api.protocol import parse_completion_request
from textcomplete.api.serving import CompletionService, RequestInfo
from textcomplete.playground import is_page_path
from textcomplete.playground import routes as playground_routes

log = logging.getLogger("textcomplete.server")
access_log = logging.getLogger("textcomplete.access")
CLIENT_CLOSED = 499   # the client left before the response (nginx's convention); never seen by a client

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
               "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
               "if you're accessing the API from your browser and are prompted for a username.")
OPEN_PATHS = {"/health", "/metrics"}
BAD_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
            "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you "
            "have trouble figuring out how to fix this, please contact us through our help center at "
            "help.openai.com.)")


def mask_key(key: str) -> str:
    return f"{key[:5]}{'*' * 12}{key[-4:]}" if len(key) > 9 else "*" * len(key)


class JSONResponse(_StarletteJSON):
    """UTF-8 JSON; text that cannot be UTF-8 (a lone surrogate echoed from a request) is escaped as \\uXXXX."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status, headers=error.headers or None)


def key_id(key: str) -> str:
    """A stable, non-reversible name for an API key, for logs and per-key limits."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, but cancel it (and so abort its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    try:
        await task   # let the cancellation run the work's cleanup before answering
    except (asyncio.CancelledError, Exception):   # noqa: BLE001 - the client is gone either way
        pass
    raise ClientDisconnect   # starlette's own, as when the client leaves while its body is read


def _lone_surrogate(value: object) -> bool:
    """Whether any string in a parsed JSON value holds a lone surrogate (valid JSON, but not Unicode text)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")   # Python's parser would take NaN and Infinity as numbers


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise invalid("The JSON body of your request is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):   # JSONDecodeError is a ValueError
        raise invalid(BAD_JSON) from None
    if _lone_surrogate(body):
        raise invalid("The JSON body of your request has a string that is not valid Unicode (a lone surrogate "
                      "such as \\ud800).")
    return body


def shutting_down() -> APIError:
    """What a request still running at the shutdown deadline ends with (a 503, or in-band in a stream)."""
    return APIError(503, "The server is shutting down and aborted this request. Please retry.",
                    type="server_error", code="server_shutting_down")


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _sse_stream(chunks: AsyncIterator[dict], info: RequestInfo) -> AsyncIterator[bytes]:
    """The stream's SSE bytes. If the client leaves, the response is cancelled at a `yield` and the request
    counts as a client disconnect."""
    info.client_left = True   # until the last event has been handed over
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except APIError as exc:
        info.error = exc.message
        yield _sse({"error": {**exc.envelope()["error"], "type": "server_error"}})
    except Exception as exc:   # noqa: BLE001 - the stream has begun: report in-band (R46s)
        info.error = f"{type(exc).__name__}: {exc}"
        log.exception("stream failed")
        yield _sse(server_error().envelope())
    finally:
        await chunks.aclose()
    yield _sse("[DONE]")
    info.client_left = False


def build_app(service: CompletionService, api_keys: list[str], created: int | None = None,
              playground: bool = True) -> Starlette:
    created = created or int(time.time())
    tokenizer = service.tokenizer
    metrics = Metrics(service.engine.stats, service.admission)
    service.metrics = metrics

    def model_object(name: str) -> dict:
        # `supports_suffix` is ours: whether the model can insert (fill in the middle) with `suffix`.
        return {"id": name, "object": "model", "created": created, "owned_by": "textcomplete",
                "supports_suffix": service.supports_suffix}

    async def completions(request: Request) -> Response:
        info: RequestInfo = request.scope["state"]["info"]
        req = parse_completion_request(await _json_body(request))
        if req.stream:
            chunks = await service.stream(req, info)
            return StreamingResponse(_sse_stream(chunks, info), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            return JSONResponse(await _unless_disconnected(request, service.complete(req, info)))
        except asyncio.CancelledError:   # the server cancelled it (shutdown deadline): say so, in the envelope
            info.error = "aborted: the server is shutting down"
            return error_response(shutting_down())

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_object(n) for n in service.model_names]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in service.model_names:
            raise model_not_found(name)
        return JSONResponse(model_object(name))

    async def delete_model(request: Request) -> Response:
        """R57 (a MAY, for fine-tunes): served models are never deleted, so the answer is deleted: false."""
        name = request.path_params["model"]
        if name not in service.model_names:
            raise model_not_found(name)
        return JSONResponse({"id": name, "object": "model", "deleted": False})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def tokenizer_info(request: Request) -> Response:
        bos = tokenizer.bos_token_id
        return JSONResponse({"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_ids[0],
                             "bos_token": tokenizer.id_to_token(bos) if bos is not None else None,
                             "model_max_length": service.max_model_len, "vocab_size": tokenizer.vocab_size})

    async def tokenize(request: Request) -> Response:
        body = await _json_body(request)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise invalid("'prompt' must be a string.", param="prompt")
        special = body.get("add_special_tokens", True)
        ids = tokenizer.encode(text, add_special_tokens=bool(special))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len})

    async def detokenize(request: Request) -> Response:
        body = await _json_body(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < tokenizer.vocab_size for t in ids):
            raise invalid("'tokens' must be an array of token ids in the vocabulary.", param="tokens")
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (404, 405):
            return error_response(APIError(404, f"Invalid URL ({request.method} {request.url.path})",
                                           code="unknown_url"))
        return error_response(APIError(exc.status_code, str(exc.detail)))

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        """The client left (while sending its body, or before its answer was ready): nobody reads this."""
        request.scope["state"]["info"].client_left = True
        return Response(status_code=CLIENT_CLOSED)

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        info = request.scope.get("state", {}).get("info")
        if info is not None:
            info.error = f"{type(exc).__name__}: {exc}"
        return error_response(server_error())

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/models/{model:path}", delete_model, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        *(playground_routes() if playground else []),   # the page at / and /playground
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                       ClientDisconnect: on_client_gone, Exception: on_error})
    return RequestIdAndAuth(app, api_keys, service, metrics)


class RequestIdAndAuth:
    """ASGI middleware around every HTTP request: the request id, API keys, the body's size and time limits,
    the x-ratelimit-* headers (R54), and afterwards the request's metrics and its one log line."""

    def __init__(self, app, api_keys: list[str], service: CompletionService, metrics: Metrics) -> None:
        self.app, self.api_keys, self.service, self.metrics = app, api_keys, service, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        key = _bearer_key(request)
        info = RequestInfo(key_id=key_id(key) if key else "-")
        scope.setdefault("state", {})["info"] = info
        status = CLIENT_CLOSED

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                extra = [("x-request-id", request_id), *self.service.capacity_headers(info.key_id).items()]
                message["headers"] = list(message["headers"]) + [(k.encode(), v.encode()) for k, v in extra]
            await send(message)

        try:
            error = _auth_error(request, self.api_keys, key)
            if error is not None:
                return await error_response(error)(scope, receive, send_with_id)
            limits = self.service.limits
            await self.app(scope, _limited_body(receive, limits.max_request_body_bytes, limits.request_body_timeout),
                           send_with_id)
        finally:
            info.release()
            self._record(request, request_id, info, CLIENT_CLOSED if info.client_left else status)

    def _record(self, request: Request, request_id: str, info: RequestInfo, status: int) -> None:
        path = request.url.path
        latency = time.monotonic() - info.arrival
        label = path if path in _METRIC_PATHS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        self.metrics.requests.labels(path=label, status=str(status)).inc()
        if info.model is None:    # not a completion that got as far as the engine
            if path not in ("/metrics", "/health"):
                access_log.info(json.dumps({"request_id": request_id, "method": request.method, "path": path,
                                            "status": status, "latency_ms": round(latency * 1000, 1),
                                            "key_id": info.key_id}))
            return
        self.metrics.generation_tokens.inc(info.completion_tokens)
        if status == 200:
            self.metrics.prompt_tokens.inc(info.prompt_tokens)
            self.metrics.request_duration.observe(latency)
        line = {"request_id": request_id, "method": request.method, "path": path, "status": status,
                "model": info.model, "stream": info.stream, "prompt_tokens": info.prompt_tokens,
                "completion_tokens": info.completion_tokens, "latency_ms": round(latency * 1000, 1),
                "ttft_ms": None if info.first_token_at is None else round((info.first_token_at - info.arrival) * 1000, 1),
                "user": info.user, "key_id": info.key_id}
        if info.error:
            line["error"] = info.error
        access_log.info(json.dumps(line))   # ASCII: a log line never fails on odd text


_METRIC_PATHS = {"/v1/completions", "/v1/models", "/health", "/metrics", "/tokenizer_info", "/tokenize", "/detokenize"}


def _limited_body(receive, max_bytes: int, timeout: float):
    """`receive` that refuses a body over `max_bytes` (413) or one not complete within `timeout` seconds (408).

    A body somewhat over the limit is read to its end first, so the client sees the 413 rather than a reset.
    """
    deadline = time.monotonic() + timeout
    received, complete = 0, False

    async def next_message():
        try:
            return await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {timeout:g} seconds.",
                           code="request_timeout") from None

    async def limited():
        nonlocal received, complete
        if complete:
            return await receive()
        message = await next_message()
        if message["type"] != "http.request":
            return message
        received += len(message.get("body", b""))
        complete = not message.get("more_body", False)
        if received > max_bytes:
            while not complete and received <= 4 * max_bytes:   # drain, so the answer can be read
                message = await next_message()
                if message["type"] != "http.request":
                    raise ClientDisconnect   # gone before its answer: nobody reads the 413
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            raise APIError(413, f"The request body is too large: this server accepts at most {max_bytes} bytes.",
                           code="request_too_large")
        return message

    return limited


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def _auth_error(request: Request, api_keys: list[str], key: str | None) -> APIError | None:
    if not api_keys or request.url.path in OPEN_PATHS or is_page_path(request.url.path):
        return None   # no key configured: the server is open (R9); the page's own files need none
    if key is None:
        return APIError(401, MISSING_KEY)
    if not _known_key(key, api_keys):
        return APIError(401, f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
    return None


def _known_key(key: str, api_keys: list[str]) -> bool:
    """Whether `key` is one of `api_keys`, in time that depends on neither which key matched nor where a
    near miss first differs (every key is compared, each in constant time)."""
    given = key.encode()
    found = False
    for configured in api_keys:
        found |= hmac.compare_digest(given, configured.encode())
    return found
