"""The async interface the API layer uses: submit a request, iterate its outputs, abort it.

One background thread runs the engine loop and owns all engine state; callers talk to it through a
command queue, and each request's outputs come back on its own asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.outputs import EngineStats, RequestOutput
from textcomplete.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _FailAll:
    make_error: Callable[[], BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, config: EngineConfig | None = None) -> None:
        """Wrap a built engine, or (better) give a config and let the engine thread build it.

        Built on its own thread, the engine is the only user of torch's thread pool: when two threads
        each start parallel torch work, their OpenMP teams fight over the cores (decoding ran at half speed).
        """
        self._commands: queue.SimpleQueue[_Add | _Abort | _FailAll | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}     # touched only by the engine thread
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._stats = EngineStats()   # replaced (never mutated) by the engine thread after each step
        self.engine = engine
        self._thread = threading.Thread(target=self._run, args=(config,), name="engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.spec.vocab_size

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def block_size(self) -> int:
        return self.engine.config.block_size

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache holds (fixed once the engine is built, so safe from any thread)."""
        return self.engine.allocator.num_blocks * self.engine.config.block_size

    @property
    def alive(self) -> bool:
        """Whether the engine loop still runs (a replica's health check)."""
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The engine's load and counters as of its last step or command (safe from any thread)."""
        return self._stats

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError if the engine could never run this request (safe from any thread)."""
        self.engine.check_request(prompt_token_ids, params)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them; leaving early aborts the request.

        Raises ValueError (before any output) if the engine refuses the request.
        """
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt_token_ids, params, asyncio.get_running_loop(), outputs))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason == "error":
                    finished = True
                    raise RuntimeError(item.error or "the engine failed this request")
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Abort every request in flight; each caller's `generate` raises its own `make_error()`."""
        self._commands.put(_FailAll(make_error))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)

    def _run(self, config: EngineConfig | None) -> None:
        try:
            if self.engine is None:
                self.engine = LLMEngine(config)
        except BaseException as exc:   # noqa: BLE001 - handed to the constructor, which re-raises
            self._build_error = exc
            return
        finally:
            self._ready.set()
        self._stats = self.engine.stats()
        while True:
            # Block for a command only when there is nothing to compute.
            if not self._drain_commands(block=not self.engine.has_unfinished_requests()):
                return
            if self.engine.has_unfinished_requests():
                self._step()
            self._stats = self.engine.stats()

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; False when told to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _FailAll):
                self._fail_all(command.make_error)
            else:
                out = self.engine.abort_request(command.request_id)
                if out is not None:
                    self._deliver(out)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except ValueError as exc:
            _send(command, exc)
            return
        self._streams[command.request_id] = command

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        failed = list(self._streams)
        for request_id in failed:
            self.engine.abort_request(request_id)
        self._stats = self.engine.stats()
        for request_id in failed:
            _send(self._streams.pop(request_id), make_error())

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:   # noqa: BLE001 - fail the running requests, keep the loop alive
            log.exception("engine step failed; aborting the requests it held")
            message = f"engine error: {exc}"
            self._fail_all(lambda: RuntimeError(message))
            return
        # Publish before delivering: a caller that has its last output then reads stats at least that new.
        self._stats = self.engine.stats()
        for out in outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        if not _send(stream, out) and not out.finished:
            # Nobody can read this request's outputs any more: stop computing them.
            del self._streams[out.request_id]
            self.engine.abort_request(out.request_id)


def _send(stream: _Add, item: RequestOutput | BaseException) -> bool:
    """Hand an item to the caller's event loop; False if that loop has closed."""
    try:
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)
    except RuntimeError:
        return False
    return True
