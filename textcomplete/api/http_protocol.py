"""uvicorn's HTTP/1.1 protocol with a deadline for the request head.

uvicorn times out idle keep-alive connections and the app times out slow bodies, but nothing bounds how
long a client may take to send a request's line and headers, so a client trickling them ("slowloris")
holds its connection open forever. Here a connection must deliver each request head within
`header_timeout` seconds of the connection opening or of the first byte of that request; otherwise it
gets a 408 in the error envelope and is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {
        "message": f"The request line and headers did not arrive within {seconds:g} seconds.",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def protocol_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class (for uvicorn.Config(http=...)) that enforces `header_timeout`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:   # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_header_timer()     # a request head has begun (or is awaited) and is incomplete
            else:
                self._disarm_header_timer()  # the head is complete: the body has its own deadline

        def on_response_complete(self) -> None:
            self._disarm_header_timer()      # idle again: uvicorn's keep-alive timeout takes over
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(_timeout_response(header_timeout))
                self.transport.close()

    return HeaderTimeoutProtocol
