"""uvicorn's h11 protocol with the limits a public server needs and uvicorn leaves out.

uvicorn times out a connection that is idle after a response (timeout_keep_alive), but not one
that never sends a complete request line and headers (a new idle connection, or one dribbling
headers); it answers a malformed request line and headers over the h11 size limit with a
plain-text 400, and connections over `limit_concurrency` with a plain-text 503. Here:

- a connection gets `header_timeout_s` to deliver each request's line and headers; then it is
  answered 408 (if it sent part of them) and closed;
- a malformed request gets a JSON 400, headers over `max_header_bytes` a JSON 431;
- a connection beyond `limit_concurrency` open ones gets a JSON 503 for its request (read in
  full first, so that the client can read the reply) and is closed.

Errors have the OpenAI shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import http
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps({"error": {"message": " ".join(message.split()), "type": kind, "param": param,
                                 "code": None}}).encode()


def _raw_response(status: int, message: str) -> bytes:
    """A whole JSON error response, written without h11 (whose state may not allow one)."""
    body = error_body(status, message)
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def refuse_busy(limit: int):
    """An ASGI app answering 503 after reading the request body."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        message = await receive()
        while message.get("more_body"):
            message = await receive()
        body = error_body(503, f"the server holds its limit of {limit} connections; retry later")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app


LINGER_S = 2.0  # after an error reply, what the client still sends is read and dropped this long


def guarded_protocol(header_timeout_s: float, max_header_bytes: int, limit_concurrency: int) -> type:
    """An H11Protocol subclass with these limits (uvicorn.Config(http=...) takes the class)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head, self._head_done = bytearray(), False
            self._header_timer = None
            self._discarding = False
            if len(self.connections) > limit_concurrency:
                self.app = refuse_busy(limit_concurrency)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if not self._head_done:  # h11 limits only a head that is still incomplete
                self._head += data[:max_header_bytes + 4 - len(self._head)]
                self._head_done = b"\r\n\r\n" in self._head
                if not self._head_done and len(self._head) > max_header_bytes:
                    self._answer_and_close(431, f"request line and headers over {max_header_bytes} bytes")
                    return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head, self._head_done = bytearray(), False
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._answer_and_close(400, "malformed HTTP request (request line or headers)")

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self._head:
                self._answer_and_close(408, f"request line and headers not received within {header_timeout_s}s")
            else:
                self.transport.close()

        def _answer_and_close(self, status: int, message: str) -> None:
            """Replies, then reads and drops what the client is still sending for LINGER_S
            before closing: closing with unread data would reset the connection, and the
            client could lose the reply."""
            self._cancel_header_timer()
            self._unset_keepalive_if_required()
            self._discarding = True
            self.transport.write(_raw_response(status, message))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedH11Protocol
