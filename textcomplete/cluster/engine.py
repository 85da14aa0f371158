"""The front end's engine when the replicas run on Ray Serve: `AsyncEngine`'s interface over a deployment handle.

`CompletionService` and the ASGI app use it unchanged. Each engine request becomes one streaming handle
call carrying its prompt's block hashes for the router; a pump task moves the replica's outputs onto the
request's own queue, so an abort, a shutdown or a dead replica all end the request the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from textcomplete.api.errors import APIError
from textcomplete.cluster.board import BoardCollector, ReplicaBoard
from textcomplete.cluster.protocol import ReplicaDescription, ReplicaOutput, ReplicaRequest
from textcomplete.engine.block_manager import reusable_prefix_hashes
from textcomplete.engine.engine import check_request_limits
from textcomplete.engine.outputs import EngineStats, RequestOutput
from textcomplete.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
RETRIES = 3   # a request whose replica dies before its first output is sent again, at most this often


def replica_lost() -> APIError:
    """What a request ends with when its replica died after it had started (a 503, or in-band in a stream)."""
    return APIError(503, "The engine replica running this request stopped before it finished. Please retry.",
                    type="server_error", code="replica_unavailable")


class _ReplicaDied(Exception):
    """The replica's process is gone (Ray's ActorDiedError): safe to retry if nothing came back yet."""


_END = object()       # the replica's stream ended
_ABORTED = object()   # abort() was called: the request ends as the engine ends an aborted one


@dataclass
class _Call:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pump: asyncio.Task | None = None
    error: BaseException | None = None   # set by fail_all: the request ends with it


class ClusterEngine:
    def __init__(self, handle, description: ReplicaDescription, board: ReplicaBoard, capacity_replicas: int,
                 close: Callable[[], None]) -> None:
        """`capacity_replicas`: how many replicas the front end's admission counts on (the most it may run)."""
        self._handle = handle.options(stream=True)
        self._d = description
        self.board = board
        self._capacity = capacity_replicas
        self._close = close
        self._calls: dict[str, _Call] = {}
        total = description.num_blocks
        board.observe(description.replica, description.pid,
                      EngineStats(kv_blocks_total=total, kv_blocks_free=total), description.node)

    tokenizer = property(lambda self: self._d.tokenizer)
    fingerprint = property(lambda self: self._d.fingerprint)
    max_model_len = property(lambda self: self._d.max_model_len)
    vocab_size = property(lambda self: self._d.vocab_size)
    block_size = property(lambda self: self._d.block_size)

    @property
    def max_num_seqs(self) -> int:
        return self._d.max_num_seqs * self._capacity

    @property
    def kv_cache_tokens(self) -> int:
        return self._d.num_blocks * self._d.block_size * self._capacity

    def stats(self) -> EngineStats:
        return self.board.total()

    def collectors(self) -> list:
        """Extra Prometheus collectors for /metrics: the per-replica series."""
        return [BoardCollector(self.board)]

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        d = self._d
        check_request_limits(prompt_token_ids, params, d.vocab_size, d.max_model_len, d.num_blocks, d.block_size)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs from whichever replica the router picks; leaving early aborts it there.

        Raises ValueError if the replica refuses the request, and `replica_lost()` if its replica dies
        after the first output (before it, the request is sent again, to a live replica).
        """
        request = ReplicaRequest(request_id, tuple(prompt_token_ids), params,
                                 tuple(reusable_prefix_hashes(prompt_token_ids, self.block_size)))
        call = self._calls[request_id] = _Call()
        try:
            for attempt in range(RETRIES + 1):
                call.pump = asyncio.create_task(self._pump(request, call.queue))
                started = False
                while True:
                    item = await call.queue.get()
                    if call.error is not None:
                        raise call.error
                    if isinstance(item, ReplicaOutput):
                        if not started:
                            started = True
                            self.board.served(item.replica, item.output.num_cached_tokens)
                        self.board.observe(item.replica, item.pid, item.stats)
                        yield item.output
                        if item.output.finished:
                            return
                        continue
                    if item is _ABORTED:
                        yield RequestOutput(request_id, (), finished=True, finish_reason="abort",
                                            num_prompt_tokens=len(prompt_token_ids))
                        return
                    if isinstance(item, _ReplicaDied) and not started and attempt < RETRIES:
                        log.warning("request %s: its replica died before it started; sending it again", request_id)
                        break
                    if isinstance(item, _ReplicaDied):
                        raise replica_lost() from item
                    if item is _END:
                        raise RuntimeError("the replica ended the request before it finished")
                    raise item
        finally:
            if call.pump is not None and not call.pump.done():
                call.pump.cancel()
            self._calls.pop(request_id, None)

    async def _pump(self, request: ReplicaRequest, queue: asyncio.Queue) -> None:
        """Move one handle call's stream onto `queue`; cancelling this task cancels the call on its replica."""
        stream = self._handle.generate.remote(request)
        try:
            async for item in stream:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:   # noqa: BLE001 - handed to the request, which raises it
            queue.put_nowait(_translate(exc))

    def abort(self, request_id: str) -> None:
        """Cancel the request on its replica; its `generate` ends with an output finished by "abort"."""
        call = self._calls.get(request_id)
        if call is not None:
            if call.pump is not None:
                call.pump.cancel()
            call.queue.put_nowait(_ABORTED)

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """End every request in flight; each caller's `generate` raises its own `make_error()`."""
        for call in list(self._calls.values()):
            call.error = make_error()
            if call.pump is not None:
                call.pump.cancel()
            call.queue.put_nowait(_END)   # wakes the reader, which finds the error first

    def shutdown(self) -> None:
        self._close()


def _translate(exc: Exception) -> BaseException:
    """A Ray failure as what the API layer understands: ValueError (refused), _ReplicaDied, or another error."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    if isinstance(exc, ActorDiedError):
        return _ReplicaDied(str(exc))
    if isinstance(exc, (ActorUnavailableError, RayActorError)):
        return replica_lost()
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ActorDiedError):
            return _ReplicaDied(str(cause))
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
        return RuntimeError(f"{type(cause).__name__}: {cause}" if cause is not None else str(exc))
    return exc
