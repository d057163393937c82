"""The server as one object: :class:`Server` wires the parts together and :func:`serve` runs it until SIGTERM or
SIGINT. ``mtlib-serve`` (:mod:`serving.cli`) is a thin command line over :func:`serve`.

The parts, each a module named by what it does:

* :mod:`serving.options`: :class:`~serving.options.ServerOptions`, the settings every part reads;
* :mod:`serving.repository`: the Triton-layout repository on disk and ``config.pbtxt``;
* :mod:`serving.sessions`: ONNX Runtime sessions for one version (providers, threads, checks, warm-up);
* :mod:`serving.batching`: the dynamic batcher in front of a version's sessions;
* :mod:`serving.models`: loaded versions and the manager that polls the repository and picks a version;
* :mod:`serving.protocol`: Open Inference Protocol request parsing and response encoding (JSON and binary);
* :mod:`serving.endpoints`: every endpoint, from ``(method, path, headers, body)`` to a reply;
* :mod:`serving.http_builtin` (default), :mod:`serving.http_aiohttp` and :mod:`serving.http_asgi` (uvicorn): the
  HTTP front ends;
* :mod:`serving.metrics`: the Prometheus ``/metrics`` counters.

A request goes front end -> :class:`~serving.endpoints.InferenceService` -> :class:`~serving.models.ModelManager`
(which version) -> that version's :class:`~serving.batching.DynamicBatcher` -> an ONNX Runtime session. The
repository is polled (``--repository-poll-secs``) and versions go live or retire without a restart (see
:mod:`serving.models`). SIGTERM or SIGINT stop accepting connections, let in-flight requests finish
(``--shutdown-timeout``), then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from serving.endpoints import InferenceService
from serving.http_aiohttp import AiohttpServer
from serving.http_asgi import UvicornServer
from serving.http_builtin import BuiltinHttpServer
from serving.metrics import MetricsRegistry
from serving.models import ModelManager
from serving.options import HTTP_SERVERS, ServerOptions

if TYPE_CHECKING:
    from serving.grpc_server import GrpcServer

log = logging.getLogger("mtlib.serve")

_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it, or pick another --port (0 picks a free one)",
    errno.EACCES: "ports below 1024 need privileges: pick --port 1024 or above (0 picks a free one)",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's: give --host one of its addresses, "
    "127.0.0.1 for this machine only or 0.0.0.0 for all",
}


class ListenError(OSError):
    """The front end could not open its socket (the address is in use, the port needs privileges, the host is
    not this machine's): a problem with ``--host`` or ``--port``, said in one line with how to fix it."""

    def __init__(self, host: str, port: int, err: OSError, flag: str = "--port") -> None:
        if isinstance(err, socket.gaierror):
            reason = err.strerror or str(err)
            hint = "unknown host: give --host an address or name of this machine (0.0.0.0 for all addresses)"
        else:  # asyncio words the bind error itself; the errno says it shorter
            reason = os.strerror(err.errno) if err.errno else str(err)
            hint = _LISTEN_HINTS.get(err.errno or 0, "check --host and --port")
        if flag != "--port":
            hint = hint.replace("--port", flag).replace("0 picks a free one", "0: none")
        super().__init__(f"cannot listen on {host}:{port}: {reason}; {hint}")
        self.errno = err.errno


class Server:
    """A running server: :meth:`start` loads the repository and opens the socket, :meth:`stop` shuts down
    gracefully. Use it from an event loop (:func:`serve` runs in one; tests may run it in a thread)."""

    def __init__(self, options: ServerOptions) -> None:
        if options.http_server not in HTTP_SERVERS:
            raise ValueError(f"http_server must be one of {', '.join(HTTP_SERVERS)}, got {options.http_server!r}")
        self.options = options
        self.metrics = MetricsRegistry()
        self.manager = ModelManager(options, self.metrics)
        self.service = InferenceService(self.manager, options)
        self.frontend: BuiltinHttpServer | AiohttpServer | UvicornServer | None = None
        self.port: int | None = None
        self.grpc: GrpcServer | None = None
        self.grpc_port: int | None = None

    async def start(self) -> None:
        await self.manager.start()
        if self.options.http_server == "aiohttp":
            self.frontend = AiohttpServer(self.service, self.options)
        elif self.options.http_server == "uvicorn":
            self.frontend = UvicornServer(self.service, self.options)
        else:
            self.frontend = BuiltinHttpServer(self.service, self.options)
        try:
            self.port = await self.frontend.start()
        except OSError as err:  # the address is taken, not allowed or not this machine's
            await self.stop()
            raise ListenError(self.options.host, self.options.port, err) from err
        log.info("serving %s on http://%s:%d", self.options.model_repository, self.options.host, self.port)
        if self.options.grpc_port:
            try:  # grpcio and tritonclient[grpc] only when gRPC is on
                from serving.grpc_server import GrpcServer
            except ImportError as err:
                log.warning("gRPC is off: %s (pip install 'tritonclient[grpc]'; --grpc-port 0 says so)", err)
                return
            self.grpc = GrpcServer(self.service, self.options)
            try:
                self.grpc_port = await self.grpc.start()
            except OSError as err:
                self.grpc = None
                await self.stop()
                raise ListenError(self.options.host, self.options.grpc_port, err, "--grpc-port") from err
            log.info("serving gRPC on %s:%d", self.options.host, self.grpc_port)

    async def stop(self) -> None:
        """Refuse new connections, finish in-flight requests, then drain and release every model."""
        self.service.stopping = True
        timeout = self.options.shutdown_timeout_s
        stopping = [self.frontend.stop(timeout)] if self.frontend is not None else []
        if self.grpc is not None:
            stopping.append(self.grpc.stop(timeout))
        await asyncio.gather(*stopping)
        self.frontend = self.grpc = None
        await self.manager.close()
        log.info("server stopped")


async def serve(options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT (or ``stop`` is set), then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or Windows
            loop.add_signal_handler(sig, stop.set)
    server = Server(options)
    await server.start()
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight requests")
    finally:
        await server.stop()
