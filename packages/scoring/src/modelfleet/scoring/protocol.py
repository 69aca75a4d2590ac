"""HTTP/1.1 on asyncio.Protocol with the httptools parser: keep-alive, pipelining, body limits.

Responses leave in request order: while one request waits for the thread
pool, later pipelined requests on the same connection queue behind it.
`Upgrade` requests (h2c, WebSocket) are served as plain HTTP/1.1, as RFC 9110
§7.8 lets a server do: never a 101.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import httptools

log = logging.getLogger("modelfleet.scoring.http")
_REASONS = {s.value: s.phrase for s in HTTPStatus}
#: request line + headers; larger heads get 414/431 and the connection is closed
MAX_HEAD_BYTES = 64 * 1024
#: requests queued behind a slow one on one connection before we stop reading
MAX_PIPELINED = 32
#: dropped from an Upgrade request (and from its Connection header) before it is served
_UPGRADE_HEADERS = frozenset({"upgrade", "http2-settings"})


class Request:
    """One parsed request."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "reject")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        reject: int = 0,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.reject = reject


def render(
    status: int,
    body: bytes,
    content_type: str,
    request_id: str,
    extra: list[tuple[str, str]] | None = None,
    close: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"content-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {request_id}\r\n"
        f"x-ms-request-id: {request_id}\r\n"
    )
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    if close:
        head += "connection: close\r\n"
    return (head + "\r\n").encode("latin-1") + body


Handler = Callable[[Request], "bytes | Awaitable[bytes]"]


class HttpConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        handler: Handler,
        max_body_bytes: int,
        connections: set[HttpConnection],
        error_response: Callable[[int, str], bytes],
    ) -> None:
        self._handler = handler
        self._max_body = max_body_bytes
        self._connections = connections
        self._error = error_response
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._reject = 0
        # an Upgrade request's head, replayed without the Upgrade (see _serve_without_upgrade)
        self._upgrade = False
        self._upgrade_head: bytes | None = None
        self._tunnel = False
        self._queue: deque[Request] = deque()
        self._queue_paused = False
        self._write_paused = False
        self._busy = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop_time = asyncio.get_running_loop().time
        self.last_active = self._loop_time()

    # --- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._closing = True
        self._transport = None
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._tunnel:
            return
        self.last_active = self._loop_time()
        while data:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # the parser stops after an Upgrade request's head; what follows is
                # its body and any pipelined requests, in HTTP/1.1
                data = self._serve_without_upgrade(data[exc.args[0] :])
            except httptools.HttpParserError as exc:
                self._fail(400, f"malformed HTTP request: {exc}")
                return

    def _serve_without_upgrade(self, rest: bytes) -> bytes:
        """What to feed a fresh parser: the head again, minus the Upgrade, then the rest.

        httptools frames no body once a request asks to upgrade, so replaying the
        head without it lets the parser read the body (Content-Length or chunked)
        and the requests after it as usual: `curl --http2 -d ...` sends exactly that.
        """
        head, self._upgrade_head, self._upgrade = self._upgrade_head, None, False
        if head is None or self._closing:
            # CONNECT (answered with keep-alive off): what follows is a tunnel we do not serve
            self._tunnel = True
            return b""
        self._parser = httptools.HttpRequestParser(self)
        return head + rest

    def pause_writing(self) -> None:
        # a client that does not read its responses must not make us buffer without bound
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._queue_paused:
            self._transport.resume_reading()

    # --- httptools callbacks ----------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._head_size = 0
        self._reject = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD_BYTES and not self._closing:
            self._fail(414, f"request URL longer than {MAX_HEAD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEAD_BYTES:
            if not self._closing:
                self._fail(431, f"request headers larger than {MAX_HEAD_BYTES} bytes")
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._headers:
            self._headers[key] += ", " + text
        else:
            self._headers[key] = text

    def on_headers_complete(self) -> None:
        if self._parser.should_upgrade() and self._parser.get_method() != b"CONNECT":
            # limits and 100-continue are applied when the head is replayed without the Upgrade
            self._upgrade = True
            return
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self._reject = 413
            if not self._busy:
                # answer at once rather than reading a body we will throw away
                self._fail(413, f"request body of {length} bytes exceeds the limit of {self._max_body} bytes")
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
            # curl and others wait up to a second for this before sending a body
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._reject:
            return
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._reject = 413
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        if self._upgrade:
            self._upgrade_head = self._head_without_upgrade()
            return
        url = self._url
        qpos = url.find(b"?")
        if qpos >= 0:
            path, query = url[:qpos].decode("latin-1"), url[qpos + 1 :].decode("latin-1")
        else:
            path, query = url.decode("latin-1"), ""
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = self._parser.get_method().decode("latin-1")
        request = Request(
            method,
            path,
            query,
            self._headers,
            body,
            # after a CONNECT the client speaks a tunnelled protocol: answer, then close
            self._parser.should_keep_alive() and not self._reject and method != "CONNECT",
            self._reject,
        )
        if self._busy:
            self._queue.append(request)
            if len(self._queue) >= MAX_PIPELINED and self._transport is not None and not self._queue_paused:
                # a client pipelining far ahead of a slow request must not fill our memory
                self._queue_paused = True
                self._transport.pause_reading()
        else:
            self._dispatch(request)

    def _head_without_upgrade(self) -> bytes:
        lines = [
            self._parser.get_method() + b" " + self._url
            + b" HTTP/" + self._parser.get_http_version().encode("latin-1")
        ]
        for key, value in self._headers.items():
            if key in _UPGRADE_HEADERS:
                continue
            if key == "connection":
                tokens = [t for t in value.split(",") if t.strip().lower() not in _UPGRADE_HEADERS]
                if not tokens:
                    continue
                value = ",".join(tokens).strip()
            lines.append(f"{key}: {value}".encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    # --- request handling ---------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        try:
            result = self._handler(request)
        except Exception:  # the handler answers errors itself; this is a last resort
            log.exception("event=handler_failed method=%s path=%s", request.method, request.path)
            result = self._error(500, "internal server error")
        if type(result) is bytes:
            self._write(result, request)
            return
        self._busy = True
        self._task = asyncio.ensure_future(self._finish(request, result))  # type: ignore[arg-type]

    async def _finish(self, request: Request, pending: Awaitable[bytes]) -> None:
        try:
            response = await pending
        except Exception:
            log.exception("event=handler_failed method=%s path=%s", request.method, request.path)
            response = self._error(500, "internal server error")
        self._busy = False
        self._write(response, request)
        while self._queue and not self._busy and not self._closing:
            self._dispatch(self._queue.popleft())
        if self._queue_paused and len(self._queue) < MAX_PIPELINED // 2:
            self._queue_paused = False
            if self._transport is not None and not self._write_paused:
                self._transport.resume_reading()

    def _write(self, response: bytes, request: Request) -> None:
        transport = self._transport
        if transport is None:
            return
        if request.method == "HEAD":
            response = response[: response.find(b"\r\n\r\n") + 4]
        transport.write(response)
        if not request.keep_alive:
            self._closing = True
            transport.close()

    def _fail(self, status: int, message: str) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.write(self._error(status, message))
            self._transport.close()

    @property
    def busy(self) -> bool:
        """A request on this connection is waiting for its response."""
        return self._busy or bool(self._queue)

    def close(self) -> None:
        """Close now (server shutdown)."""
        if self._transport is not None:
            self._transport.close()
