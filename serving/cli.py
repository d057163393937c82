"""``mtlib-serve``: the command line of the server. It parses the arguments into a
:class:`~serving.options.ServerOptions` and runs :func:`serving.server.serve` until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from serving.options import ServerOptions
from serving.server import serve


def parse_args(argv: list[str] | None = None) -> tuple[ServerOptions, str]:
    parser = argparse.ArgumentParser(
        prog="mtlib-serve", description="Open Inference Protocol (KServe v2) server for a Triton-layout ONNX repository"
    )
    parser.add_argument(
        "--model-repository", required=True, type=Path, help="REPO/NAME/{config.pbtxt,VERSION/model.onnx}"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime intra-op threads per session")
    parser.add_argument("--inter-op-threads", type=int, default=1, help="ONNX Runtime inter-op threads per session")
    parser.add_argument(
        "--max-body-size", type=int, default=64 * 1024 * 1024, help="largest request body in bytes (413 above)"
    )
    parser.add_argument(
        "--repository-poll-secs", type=float, default=1.0, help="seconds between repository scans; 0 disables"
    )
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests may take")
    parser.add_argument(
        "--inline-max-us",
        type=float,
        default=50.0,
        help="run a batch on the event loop when the model is idle and it should take at most this many "
        "microseconds (saves two thread hand-offs); 0: always in a worker thread",
    )
    parser.add_argument(
        "--http-server",
        default="builtin",
        choices=["builtin", "aiohttp"],
        help="HTTP implementation: the built-in HTTP/1.1 protocol (lower overhead) or aiohttp",
    )
    parser.add_argument(
        "--keepalive-timeout", type=float, default=75.0, help="seconds before an idle keep-alive connection closes"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    for flag, value, low in (
        ("--intra-op-threads", args.intra_op_threads, 0),
        ("--inter-op-threads", args.inter_op_threads, 0),
        ("--max-body-size", args.max_body_size, 1),
        ("--repository-poll-secs", args.repository_poll_secs, 0),
        ("--shutdown-timeout", args.shutdown_timeout, 0),
        ("--inline-max-us", args.inline_max_us, 0),
        ("--keepalive-timeout", args.keepalive_timeout, 0.001),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository} is not a directory")
    options = ServerOptions(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        max_body_size=args.max_body_size,
        poll_interval_s=args.repository_poll_secs,
        shutdown_timeout_s=args.shutdown_timeout,
        inline_max_us=args.inline_max_us,
        http_server=args.http_server,
        keepalive_timeout_s=args.keepalive_timeout,
    )
    return options, args.log_level


def main(argv: list[str] | None = None) -> None:
    """Console script ``mtlib-serve``."""
    options, level = parse_args(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    asyncio.run(serve(options))


if __name__ == "__main__":
    main()
