"""In-process clients with the call shape of the official Python SDK: `Client` and `AsyncClient`.

They run the engine in this process and go through the same validation and response building as the
server (`parse_completion_request` + `CompletionService`), with no HTTP; errors are raised as exceptions
named like the SDK's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from textcomplete.api.errors import APIError as _ServiceError
from textcomplete.api.protocol import parse_completion_request
from textcomplete.api.serving import CompletionService
from textcomplete.config import DEFAULT_MODEL, EngineConfig
from textcomplete.engine.async_engine import AsyncEngine


class APIError(Exception):
    """Base of the errors the clients raise; `message`, `type`, `param` and `code` as in the envelope."""

    status_code: int = 500

    def __init__(self, message: str, body: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body or {}
        self.type, self.param, self.code = self.body.get("type"), self.body.get("param"), self.body.get("code")


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    status_code = 401


class NotFoundError(APIError):
    status_code = 404


class RateLimitError(APIError):
    status_code = 429


class InternalServerError(APIError):
    status_code = 500


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 429: RateLimitError}


def error_for(status: int, body: dict) -> APIError:
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIError)
    return cls(body.get("message", "error"), body)


class Obj:
    """A response object with attribute access (`completion.choices[0].text`), built from the wire JSON."""

    def __init__(self, data: dict) -> None:
        self._data = data
        for key, value in data.items():
            # top_logprobs entries map token text to a number: they stay dicts, as in the SDK.
            setattr(self, key, value if key == "top_logprobs" else _wrap(value))

    def to_dict(self) -> dict:
        return self._data

    model_dump = to_dict

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


class Completion(Obj):
    """The same object `POST /v1/completions` returns (or one stream chunk of it)."""


class Model(Obj):
    pass


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Obj(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class _AsyncCompletions:
    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def create(self, **fields: Any) -> Completion | AsyncIterator[Completion]:
        service = self._client._service
        try:
            req = parse_completion_request(fields)
            if req.stream:
                chunks = await service.stream(req)
                return _completions(chunks)
            return Completion(await service.complete(req))
        except _ServiceError as exc:
            raise error_for(exc.status, exc.envelope()["error"]) from None


async def _completions(chunks: AsyncIterator[dict]) -> AsyncIterator[Completion]:
    async for chunk in chunks:
        yield Completion(chunk)


class _AsyncModels:
    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def list(self) -> list[Model]:
        return [self._client._model_object(name) for name in self._client._service.model_names]

    async def retrieve(self, model: str) -> Model:
        if model not in self._client._service.model_names:
            raise NotFoundError(f"The model `{model}` does not exist or you do not have access to it.",
                                {"type": "invalid_request_error", "param": "model", "code": "model_not_found"})
        return self._client._model_object(model)


class AsyncClient:
    """`AsyncClient(model=...)`: `await client.completions.create(...)`, `async for` over streams."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        self.model = model
        self._engine = AsyncEngine(config=EngineConfig(model=model, **engine_options))
        self._service = CompletionService(self._engine, [model])
        self.completions = _AsyncCompletions(self)
        self.models = _AsyncModels(self)

    def _model_object(self, name: str) -> Model:
        return Model({"id": name, "object": "model", "created": 0, "owned_by": "textcomplete",
                      "supports_suffix": self._service.supports_suffix})

    def close(self) -> None:
        self._engine.shutdown()


class _SyncCompletions:
    def __init__(self, client: "Client") -> None:
        self._client = client

    def create(self, **fields: Any) -> Completion | Iterator[Completion]:
        result = self._client._call(self._client._async.completions.create(**fields))
        if fields.get("stream"):
            return self._client._iterate(result)
        return result


class _SyncModels:
    def __init__(self, client: "Client") -> None:
        self._client = client

    def list(self) -> list[Model]:
        return self._client._call(self._client._async.models.list())

    def retrieve(self, model: str) -> Model:
        return self._client._call(self._client._async.models.retrieve(model))


class Client:
    """`Client(model=...)`: `client.completions.create(model=..., prompt=...)` like the official SDK's."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="client-loop", daemon=True)
        self._thread.start()
        self._async = self._call(_build_async(model, engine_options))
        self.completions = _SyncCompletions(self)
        self.models = _SyncModels(self)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _iterate(self, chunks: AsyncIterator[Completion]) -> Iterator[Completion]:
        while True:
            try:
                yield self._call(chunks.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._async.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


async def _build_async(model: str, options: dict) -> AsyncClient:
    return AsyncClient(model, **options)
