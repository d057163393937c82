"""The third HTTP front end (``--http-server uvicorn``): :class:`AsgiApp`, an ASGI application over the same
:class:`~serving.endpoints.InferenceService`, run by uvicorn with its httptools parser (:class:`UvicornServer`);
``mtlib-serve`` runs every front end on uvloop when it is installed.

It exists so that the built-in front end (:mod:`serving.http_builtin`) has to earn its place against the
fastest stack the Python ecosystem offers, measured side by side in ``benchmarks/serving.py`` (the README has
the numbers), and for deployments that want an ASGI server they already run and trust. The app is plain ASGI
3, so any ASGI server (hypercorn, granian, ...) can host it too: ``AsgiApp(server.service)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from serving.endpoints import LINGER_S, InferenceService, error_reply, too_large
from serving.options import ServerOptions


class AsgiApp:
    """ASGI 3 over an :class:`InferenceService`: reads the body (at most ``max_body`` bytes, 413 beyond; a
    ``Content-Length`` over the limit is refused before any body is read), calls :meth:`InferenceService.handle`
    and sends its :class:`~serving.endpoints.Reply`. ``lifespan`` events are acknowledged."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        limit = self.service.max_body
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            headers[key.decode("latin-1")] = value.decode("latin-1")  # ASGI servers send lower-case names
        reply = None
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            reply = error_reply(too_large(limit, int(declared)), 413)
            await _discard_body(receive)  # closing with the upload unread would reset it before the answer is read
        else:
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    reply = error_reply(too_large(limit), 413)
                    if message.get("more_body", False):
                        await _discard_body(receive)
                    break
                if chunk:
                    chunks.append(chunk)
                more = message.get("more_body", False)
            if reply is None:
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                reply = await self.service.handle(scope["method"], scope["path"], headers, body)
        payload = bytes(reply.body)
        out = [(b"content-length", str(len(payload)).encode())]
        if reply.content_type is not None:
            out.append((b"content-type", reply.content_type.encode()))
        if reply.header_length is not None:
            out.append((b"inference-header-content-length", str(reply.header_length).encode()))
        if reply.allow is not None:
            out.append((b"allow", reply.allow.encode()))
        if reply.status == 413:
            out.append((b"connection", b"close"))  # the unread rest of the body is not waited for
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": payload})


async def _discard_body(receive: Any) -> None:
    """Read and drop the rest of a refused body, for at most ``LINGER_S`` seconds (as the built-in front end)."""

    async def drain() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drain(), LINGER_S)
    except asyncio.TimeoutError:
        return


class UvicornServer:
    """:class:`AsgiApp` on uvicorn (httptools parser, no access log, signals left to :func:`serving.server.serve`),
    listening on a socket opened here so that port 0 gets a free port and bind errors are plain ``OSError``."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self._server: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        import uvicorn

        class _Server(uvicorn.Server):
            def capture_signals(self) -> Any:  # serving.server.serve owns SIGTERM / SIGINT
                return contextlib.nullcontext()

        infos = socket.getaddrinfo(self.options.host, self.options.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            AsgiApp(self.service),
            http="httptools",
            loop="none",  # the running loop: mtlib-serve's (uvloop when installed)
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=int(max(1, self.options.keepalive_timeout_s)),
            timeout_graceful_shutdown=self.options.shutdown_timeout_s,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)
        return int(sock.getsockname()[1])

    async def stop(self, timeout: float) -> None:
        """uvicorn's graceful shutdown: stop listening, let in-flight requests finish (up to ``timeout``)."""
        if self._server is None:
            return
        self._server.config.timeout_graceful_shutdown = timeout
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
