"""The ASGI app: routes, API keys, request ids, SSE framing and the mapping of every failure to an envelope.

Semantics live in `serving.py`; this module only moves JSON and bytes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from textcomplete.api.errors import APIError, invalid, model_not_found, server_error
from textcomplete.api.protocol import parse_completion_request
from textcomplete.api.serving import CompletionService

log = logging.getLogger("textcomplete.server")

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
               "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) "
               "if you're accessing the API from your browser and are prompted for a username.")
OPEN_PATHS = {"/health"}


def mask_key(key: str) -> str:
    return f"{key[:5]}{'*' * 12}{key[-4:]}" if len(key) > 9 else "*" * len(key)


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status, headers=headers)


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                      "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
                      "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
                      "contact us through our help center at help.openai.com.)") from None


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except APIError as exc:
        yield _sse({"error": {**exc.envelope()["error"], "type": "server_error"}})
    except Exception:   # noqa: BLE001 - the stream has begun: report in-band (R46s)
        log.exception("stream failed")
        yield _sse(server_error().envelope())
    finally:
        await chunks.aclose()
    yield _sse("[DONE]")


def build_app(service: CompletionService, api_keys: list[str], created: int | None = None) -> Starlette:
    created = created or int(time.time())
    tokenizer = service.tokenizer

    def model_object(name: str) -> dict:
        # `supports_suffix` is ours: whether the model can insert (fill in the middle) with `suffix`.
        return {"id": name, "object": "model", "created": created, "owned_by": "textcomplete",
                "supports_suffix": service.supports_suffix}

    async def completions(request: Request) -> Response:
        req = parse_completion_request(await _json_body(request))
        if req.stream:
            chunks = await service.stream(req)
            return StreamingResponse(_sse_stream(chunks), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return JSONResponse(await service.complete(req))

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

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        return error_response(server_error())

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/models/{model:path}", delete_model, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                       Exception: on_error})
    return RequestIdAndAuth(app, api_keys, service.capacity_headers)


class RequestIdAndAuth:
    """ASGI middleware: refuse requests without a valid key (when keys are set); tag every response with an
    id and the informational x-ratelimit-* headers (R54)."""

    def __init__(self, app, api_keys: list[str], capacity_headers) -> None:
        self.app, self.api_keys, self.capacity_headers = app, api_keys, capacity_headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                extra = [("x-request-id", request_id), *self.capacity_headers().items()]
                message["headers"] = list(message["headers"]) + [(k.encode(), v.encode()) for k, v in extra]
            await send(message)

        error = _auth_error(request, self.api_keys)
        if error is not None:
            return await error_response(error)(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


def _auth_error(request: Request, api_keys: list[str]) -> APIError | None:
    if not api_keys or request.url.path in OPEN_PATHS:
        return None   # no key configured: the server is open (R9)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return APIError(401, MISSING_KEY)
    if key not in api_keys:
        return APIError(401, f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
    return None
