"""The settings of a server (:class:`ServerOptions`), one flat dataclass that every part reads: the sessions
(:mod:`serving.sessions`: thread counts), the model manager (:mod:`serving.models`: repository, polling, inline
batches), the endpoints (:mod:`serving.endpoints`: body limit) and the front ends (:mod:`serving.http_builtin`,
:mod:`serving.http_aiohttp`: address, keep-alive, shutdown). :mod:`serving.cli` fills it from the command line;
a program embedding the server builds one and hands it to :class:`serving.server.Server`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONTROL_MODES = ("none", "poll", "explicit")
HTTP_SERVERS = ("builtin", "aiohttp", "uvicorn")


@dataclass
class ServerOptions:
    """Settings of :class:`~serving.server.Server` and :func:`~serving.server.serve` (see ``mtlib-serve --help``)."""

    model_repository: Path
    host: str = "0.0.0.0"
    port: int = 8000
    grpc_port: int = 0
    """gRPC port (:mod:`serving.grpc_server`); 0: no gRPC. ``mtlib-serve --grpc-port`` defaults to 8001."""
    intra_op_threads: int = 1
    """ONNX Runtime intra-op threads per session unless ``config.pbtxt`` sets ``intra_op_thread_count``."""
    inter_op_threads: int = 1
    """ONNX Runtime inter-op threads per session unless ``config.pbtxt`` sets ``inter_op_thread_count``."""
    max_body_size: int = 64 * 1024 * 1024
    """Largest request body accepted, in bytes (after decompression); larger ones get 413."""
    poll_interval_s: float = 1.0
    """Seconds between repository scans; 0 disables polling (the load/unload endpoints still work)."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may take to finish."""
    http_server: str = "builtin"
    """``builtin`` (:class:`~serving.http_builtin.HttpConnection`, the fast path), ``aiohttp``, or ``uvicorn``
    (:mod:`serving.http_asgi`: an ASGI app on uvicorn with httptools)."""
    keepalive_timeout_s: float = 75.0
    """Idle keep-alive connections are closed after this long (built-in HTTP server)."""
    request_timeout_s: float = 10.0
    """A request partly received (head or body) with no new bytes for this long gets 408 and the connection
    closes (built-in HTTP server), so a client that stops mid-request never holds a connection until the
    keep-alive timeout."""
    inline_max_us: float = 200.0
    """Run a batch on the event loop instead of a worker thread when the model version is otherwise idle and the
    batch is expected to take at most this long (see :mod:`serving.batching`); 0: always a worker thread."""
    model_control_mode: str = "none"
    """As Triton's ``--model-control-mode``: ``none`` (load the repository at start; no polling; load and unload
    requests refused with 403 / PERMISSION_DENIED), ``poll`` (also rescan the repository every
    ``poll_interval_s``; load/unload refused), ``explicit`` (the load/unload API enabled; the repository is polled
    too when ``poll_interval_s`` > 0, unlike Triton)."""
    control_token: str | None = None
    """With ``explicit``: load/unload requests must carry it (``Authorization: Bearer <token>`` or the
    ``mtlib-control-token`` header; gRPC metadata the same); ``None``: no token asked (bind to 127.0.0.1 then)."""

    def __post_init__(self) -> None:
        if self.model_control_mode not in CONTROL_MODES:
            valid = ", ".join(CONTROL_MODES)
            raise ValueError(f"model_control_mode must be one of {valid}, got {self.model_control_mode!r}")
        if self.control_token is not None and not self.control_token:
            raise ValueError("control_token must not be empty (give none to ask for no token)")

    @property
    def polls(self) -> bool:
        """Whether the repository is rescanned (every ``poll_interval_s``)."""
        return self.model_control_mode != "none" and self.poll_interval_s > 0
