"""The second HTTP front end (``--http-server aiohttp``): the same :class:`~serving.endpoints.InferenceService`
on aiohttp's low-level server (:class:`AiohttpServer`), for deployments that prefer aiohttp's HTTP
implementation. It only adapts aiohttp's requests and responses to the service's ``handle`` and
:class:`~serving.endpoints.Reply`; :mod:`serving.http_builtin` is the faster default.
:class:`~serving.server.Server` picks one. aiohttp is imported only when this front end starts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from serving.endpoints import LINGER_S, InferenceService, error_reply, too_large
from serving.options import ServerOptions


class AiohttpServer:
    """The same service on aiohttp's low-level server (``--http-server aiohttp``): slower per request (see
    :class:`~serving.http_builtin.HttpConnection`), kept for deployments that prefer aiohttp's HTTP implementation."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self.stopping = False
        self.in_flight = 0  # handlers running, body upload included
        self._runner: Any = None

    async def _handle(self, request: Any) -> Any:
        self.in_flight += 1
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: Any) -> Any:
        from aiohttp import web

        length = request.content_length
        refused = length is not None and length > self.service.max_body
        if refused:
            reply = error_reply(too_large(self.service.max_body, length), 413)
        else:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                refused = True
                reply = error_reply(too_large(self.service.max_body), 413)
            else:
                reply = await self.service.handle(request.method, request.path, request.headers, body)
        headers = {}
        if reply.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(reply.header_length)
        if reply.allow is not None:
            headers["Allow"] = reply.allow
        if reply.content_type is not None:
            headers["Content-Type"] = reply.content_type
        response = web.Response(status=reply.status, body=bytes(reply.body), headers=headers)
        if self.stopping or refused:  # a refused body is not read: close rather than wait for it
            response.force_close()
        return response

    async def start(self) -> int:
        from aiohttp import web

        max_body = self.service.max_body

        def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> Any:
            loop = asyncio.get_running_loop()
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

        # lingering_time: how long aiohttp drains a body the handler did not read (a refused one) before closing
        server = web.Server(self._handle, request_factory=request_factory, access_log=None, lingering_time=LINGER_S)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self.options.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port, reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self, timeout: float) -> None:
        """aiohttp's own shutdown ignores bytes that arrive once it started, so a request whose body is still
        uploading would hang: first stop listening and wait for running handlers, then clean up."""
        self.stopping = True
        for site in list(self._runner.sites):
            await site.stop()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._runner.cleanup()
