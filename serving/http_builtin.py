"""The default HTTP front end: a small HTTP/1.1 implementation on ``asyncio`` (:class:`HttpConnection`, one per
connection: keep-alive, pipelining, ``Content-Length`` and chunked bodies, ``Expect: 100-continue``) and the
listener that owns the connections and shuts them down gracefully (:class:`BuiltinHttpServer`). It parses
requests and hands each one to :class:`~serving.endpoints.InferenceService`, which does everything else; the
same service runs behind aiohttp in :mod:`serving.http_aiohttp`. :class:`~serving.server.Server` picks one.

It is the default because, measured side by side on uvloop (``benchmarks/serving.py``), it is as fast as uvicorn
with httptools and faster than aiohttp, and it alone answers a stalled head or body (408 after
``--request-timeout``), bare-LF requests and framing errors with a JSON 4xx in bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

from serving.endpoints import LINGER_S, SERVER_NAME, InferenceService, Reply, error_reply, too_large
from serving.options import ServerOptions

log = logging.getLogger("mtlib.serve")


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_MAX_HEAD = 64 * 1024


def _not_http(first: bytes) -> str:
    hint = "a TLS handshake? this port speaks plain HTTP: use http://" if first == b"\x16" else "not an HTTP request"
    return f"a request starts with its method, got byte {first!r} ({hint})"


class _BadRequest(Exception):
    """A request refused at the HTTP level; ``remaining``: body bytes still to come, ``None`` if unknown."""

    def __init__(self, status: int, message: str, remaining: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.remaining = remaining


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection (RFC 9112): persistent by default, pipelined requests answered in order,
    ``Content-Length`` or ``chunked`` bodies, ``Expect: 100-continue``.

    Why not aiohttp here: with ``tritonclient`` at concurrency 1 on a busy 2-core machine, the same
    :class:`InferenceService` behind aiohttp's low-level server used ~236 us of server CPU per inference
    (its ``web.Application`` ~40 us more) and ~173 us behind this protocol; the round trip fell from ~400 to
    ~330 us. aiohttp on Python 3.11 also spends two extra event-loop iterations per request. A request is
    parsed in ``data_received`` and handled in one task; at most one per connection at a time, as HTTP/1.1
    answers in order anyway.
    """

    def __init__(self, frontend: BuiltinHttpServer) -> None:
        self.frontend = frontend
        self.service = frontend.service
        self.max_body = frontend.service.max_body
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scan = 0  # where to resume looking for the end of the request head
        self.head: tuple[str, str, dict[str, str], bool] | None = None  # method, path, headers, keep-alive
        self.length = 0  # Content-Length of the pending body, -1 for chunked
        self.busy = False  # a request is being handled
        self.continued = False  # 100 Continue sent for the pending request
        self.reading = True
        self.writable: asyncio.Future[None] | None = None
        self.last_active = 0.0
        self.eof = False  # the client closed its side
        self.linger = 0  # after refusing a request: body bytes still to discard (-1: unknown, until EOF or timeout)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.frontend.connections.add(self)
        self.last_active = self.frontend.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.frontend.connections.discard(self)
        self.transport = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.frontend.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.linger:  # a refused request's body: discard it
            if self.linger > 0:
                self.linger = max(self.linger - len(data), 0)
                if self.linger == 0 and self.transport is not None:
                    self.transport.close()
            return
        self.buffer += data
        self.last_active = self.frontend.loop.time()
        if not self.busy:
            self._next()
        elif len(self.buffer) > self.max_body + _MAX_HEAD and self.reading and self.transport is not None:
            self.transport.pause_reading()  # pipelined bytes pile up behind a running request
            self.reading = False

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy and not self.linger  # half-open until the running request is answered, then close

    @property
    def partial(self) -> bool:
        """Part of a request received (head or body) and no request running: the client owes bytes."""
        return not self.busy and not self.linger and (bool(self.buffer) or self.head is not None)

    def time_out(self, seconds: float) -> None:
        """408 for a request that stopped arriving, then close."""
        what = "request head" if self.head is None else "request body"
        message = (
            f"incomplete {what}: no bytes for {seconds:g} s (--request-timeout); a head ends with an empty line, "
            "a body has the Content-Length it declares or a last 0-size chunk"
        )
        self.buffer.clear()
        self.head = None
        self._refuse(_BadRequest(408, message, 0))

    @property
    def idle(self) -> bool:
        """No request running and none partly received (a refused body being discarded does not count)."""
        return not self.busy and (not self.buffer or self.linger != 0)

    # ---- parsing

    def _next(self) -> None:
        """Parse the next complete request in the buffer, if any, and start handling it."""
        try:
            request = self._parse()
        except _BadRequest as err:
            self._refuse(err)
            return
        if request is None:
            return
        method, path, headers, keep_alive, body = request
        self.busy = True
        self.frontend.loop.create_task(self._handle(method, path, headers, keep_alive, body))

    def _refuse(self, err: _BadRequest) -> None:
        """Answer an unusable request and close, lingering: a client still uploading the body it declared would
        get a connection reset instead of the answer if the socket closed with its bytes unread, so incoming
        bytes are discarded until the declared body is through (or ``LINGER_S`` passed)."""
        transport = self.transport
        if transport is None:
            return
        self._send(error_reply(str(err), err.status), keep_alive=False, head_only=False, close=False)
        self.linger = err.remaining if err.remaining is not None else -1  # data_received now discards
        self.buffer.clear()
        if self.linger == 0:
            transport.close()
        else:
            self.frontend.loop.call_later(LINGER_S, transport.close)

    def _parse(self) -> tuple[str, str, dict[str, str], bool, bytes] | None:
        buf = self.buffer
        if self.head is None:
            while buf[:1] == b"\n" or buf[:2] == b"\r\n":  # empty lines before a request are ignored (RFC 9112, 2.2)
                del buf[: 1 if buf[:1] == b"\n" else 2]
            if buf and not 0x41 <= (buf[0] | 0x20) - 0x20 <= 0x5A:  # a method starts with a letter
                raise _BadRequest(400, _not_http(bytes(buf[:1])))
            # the head ends with an empty line; a bare LF also ends a line (RFC 9112, 2.2)
            end, stop = buf.find(b"\n\r\n", self.scan), 3
            lf = buf.find(b"\n\n", self.scan, end if end >= 0 else len(buf))
            if lf >= 0:
                end, stop = lf, 2
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _BadRequest(431, f"request head larger than {_MAX_HEAD} bytes")
                self.scan = max(len(buf) - 2, 0)
                return None
            if end > _MAX_HEAD:
                raise _BadRequest(431, f"request head larger than {_MAX_HEAD} bytes")
            try:
                self.head, self.length = self._parse_head(bytes(buf[:end]))
            except _BadRequest as err:
                if err.remaining is not None:  # part of the refused body may have arrived already
                    err.remaining = max(err.remaining - (len(buf) - end - stop), 0)
                raise
            del buf[: end + stop]
            self.scan = 0
            self.continued = False
        method, path, headers, keep_alive = self.head
        if self.length >= 0:
            if len(buf) < self.length:
                self._maybe_continue(headers)
                return None
            with memoryview(buf) as view:
                body = bytes(view[: self.length])  # one copy (a bytearray slice would add another)
            del buf[: self.length]
        else:
            decoded = self._dechunk()
            if decoded is None:
                self._maybe_continue(headers)
                return None
            body = decoded
        self.head = None
        return method, path, headers, keep_alive, body

    def _parse_head(self, raw: bytes) -> tuple[tuple[str, str, dict[str, str], bool], int]:
        lines = raw.decode("latin-1").split("\n")
        for i, line in enumerate(lines):
            if line.endswith("\r"):
                line = lines[i] = line[:-1]
            if "\r" in line:
                raise _BadRequest(400, f"bare CR in the request head (lines end with CRLF or LF): {line[:100]!r}")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1.") or not request_line[0].isalpha():
            raise _BadRequest(400, f"malformed HTTP request line {lines[0][:100]!r}")
        method, target, version = request_line
        if not target.startswith("/"):
            raise _BadRequest(400, f"request target must be a path starting with '/', got {target[:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, f"malformed HTTP header line {line[:100]!r}")
            name = name.lower()
            value = value.strip()
            if name in headers and name in ("content-length", "transfer-encoding", "host"):
                if headers[name] != value:
                    raise _BadRequest(400, f"conflicting {name} headers")
            headers[name] = value
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        path = target.split("?", 1)[0]
        if "%" in path:
            path = unquote(path)
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise _BadRequest(400, f"Transfer-Encoding {te!r} is not supported; use chunked or Content-Length")
            if "content-length" in headers:
                raise _BadRequest(400, "a request may not have both Transfer-Encoding and Content-Length")
            length = -1
            self.chunks: list[bytes] = []
            self.chunked_size = 0
        else:
            raw_length = headers.get("content-length", "0")
            if not raw_length.isdigit():
                raise _BadRequest(400, f"Content-Length must be a non-negative integer, got {raw_length[:50]!r}")
            length = int(raw_length)
            if length > self.max_body:
                raise _BadRequest(413, too_large(self.max_body, length), length)
        return (method.upper(), path, headers, keep_alive), length

    def _dechunk(self) -> bytes | None:
        """Consume complete chunks from the buffer; the body once the last chunk (and trailers) arrived."""
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > 1024:
                    raise _BadRequest(400, "malformed chunk size line")
                return None
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, f"malformed chunk size {size_text[:20]!r}") from None
            if size == 0:
                end = buf.find(b"\r\n\r\n", line_end)  # trailers end with an empty line
                if end < 0 and buf[line_end : line_end + 4] != b"\r\n\r\n":
                    if len(buf) > _MAX_HEAD:
                        raise _BadRequest(431, "chunked trailers too large")
                    return None
                del buf[: (end if end >= 0 else line_end) + 4]
                body = b"".join(self.chunks)
                self.chunks = []
                return body
            self.chunked_size += size
            if self.chunked_size > self.max_body:
                raise _BadRequest(413, too_large(self.max_body))
            start = line_end + 2
            if len(buf) < start + size + 2:
                return None
            if buf[start + size : start + size + 2] != b"\r\n":
                raise _BadRequest(400, "chunk data not followed by CRLF")
            self.chunks.append(bytes(buf[start : start + size]))
            del buf[: start + size + 2]

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if not self.continued and headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ---- handling

    async def _handle(self, method: str, path: str, headers: dict[str, str], keep_alive: bool, body: bytes) -> None:
        try:
            reply = await self.service.handle("GET" if method == "HEAD" else method, path, headers, body)
        except asyncio.CancelledError:  # the event loop is going away
            self._send(error_reply("server shutting down", 503), keep_alive=False, head_only=False)
            raise
        except Exception as err:  # service.handle answers its own errors; this is a bug: answer and close
            log.exception("unhandled error in %s %s", method, path)
            reply = error_reply(f"internal server error: {type(err).__name__}: {err}", 500)
            keep_alive = False
        keep_alive = keep_alive and not self.frontend.stopping and not self.eof
        self._send(reply, keep_alive, head_only=method == "HEAD")
        if self.writable is not None and not self.writable.done():
            await self.writable  # the client is not reading: wait before taking its next request
        self.busy = False
        if not keep_alive or self.transport is None:
            return
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
        if self.buffer:
            self._next()

    def _send(self, reply: Reply, keep_alive: bool, head_only: bool, close: bool = True) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = reply.body
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\nContent-Length: {len(body)}\r\n"]
        if reply.content_type is not None:
            head.append(f"Content-Type: {reply.content_type}\r\n")
        if reply.header_length is not None:
            head.append(f"Inference-Header-Content-Length: {reply.header_length}\r\n")
        if reply.allow is not None:
            head.append(f"Allow: {reply.allow}\r\n")
        head.append(self.frontend.date_header())
        head.append("\r\n" if keep_alive else "Connection: close\r\n\r\n")
        data = "".join(head).encode("latin-1")
        if head_only:
            transport.write(data)
        elif len(body) < 65536:
            transport.write(data + body)
        else:
            transport.write(data)
            transport.write(body)
        if not keep_alive and close:
            transport.close()


class BuiltinHttpServer:
    """Listens with :class:`HttpConnection`; :meth:`stop` lets every started request finish."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date = ("", -1)

    def date_header(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (f"Date: {formatdate(now, usegmt=True)}\r\nServer: {SERVER_NAME}\r\n", now)
        return self._date[0]

    async def start(self) -> int:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), self.options.host, self.options.port, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.create_task(self._sweep_idle())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep_idle(self) -> None:
        """Close keep-alive connections idle for ``keepalive_timeout_s``, and answer 408 to a partly received
        request with no new bytes for ``request_timeout_s`` (one timer for all connections instead of one per
        request)."""
        timeout = self.options.keepalive_timeout_s
        patience = self.options.request_timeout_s
        while True:
            await asyncio.sleep(min(timeout, patience / 2, 5.0))
            now = self.loop.time()
            for conn in list(self.connections):
                if conn.transport is None or conn.busy:
                    continue
                if conn.partial:
                    if conn.last_active < now - patience:
                        conn.time_out(patience)
                elif conn.last_active < now - timeout:
                    conn.transport.close()

    async def stop(self, timeout: float) -> None:
        """Stop listening, close idle connections, let started requests finish (answered with
        ``Connection: close``), then close whatever is left after ``timeout`` seconds."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle and conn.transport is not None:
                    conn.transport.close()
            if not self.connections or self.loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("closing a connection with a request still running after %.1f s", timeout)
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
