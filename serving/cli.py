"""``mtlib-serve``: the command line of the server. It parses the arguments into a
:class:`~serving.options.ServerOptions`, checks that ``--model-repository`` is a repository
(:func:`serving.repository.check_repository`), and runs :func:`serving.server.serve` until SIGTERM or SIGINT.

A user mistake (a missing or wrong repository path, a bad ``--port`` or other value, an unknown option, an
address the server cannot listen on) ends with one or two lines ``mtlib-serve: error: ...`` and exit status 2,
without a traceback; ``MTLIB_DEBUG=1`` shows the traceback of the errors that have one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from mtl.cli import debugging
from serving.options import CONTROL_MODES, HTTP_SERVERS, ServerOptions
from serving.repository import RepositoryError, check_repository
from serving.server import ListenError, serve

PROG = "mtlib-serve"
TOKEN_ENV = "MTLIB_CONTROL_TOKEN"
_LOCAL = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("mtlib.serve")


class _Parser(argparse.ArgumentParser):
    """argparse's own complaints (an unknown option, a missing or malformed value) in two lines instead of the
    usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: '{self.prog} --help' lists every option\n")


def _number(
    kind: type[int] | type[float], low: float, high: float = math.inf, note: str = ""
) -> Callable[[str], float]:
    """An argparse ``type`` that reads an ``int`` or ``float`` within ``[low, high]`` and says the range otherwise."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # fails the range check below, as NaN itself does
        if not low <= value <= high:
            what = "an integer" if kind is int else "a number"
            bounds = f">= {low}" if high == math.inf else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}{note}, got {text!r}")
        return value

    return parse


# The numeric settings: flag, type (the range it checks), default, help.
_NUMBERS = (
    ("--port", _number(int, 0, 65535, " (0 picks a free one)"), 8000, "HTTP port (default 8000; 0 picks a free one)"),
    ("--grpc-port", _number(int, 0, 65535, " (0: no gRPC)"), 8001, "gRPC port (default 8001; 0: no gRPC)"),
    ("--intra-op-threads", _number(int, 0), 1, "ONNX Runtime intra-op threads per session"),
    ("--inter-op-threads", _number(int, 0), 1, "ONNX Runtime inter-op threads per session"),
    ("--max-body-size", _number(int, 1), 64 * 1024 * 1024, "largest request body in bytes (413 above)"),
    ("--repository-poll-secs", _number(float, 0), 1.0, "seconds between repository scans; 0 disables"),
    ("--shutdown-timeout", _number(float, 0), 30.0, "seconds in-flight requests may take"),
    (
        "--inline-max-us",
        _number(float, 0),
        200.0,
        "run a batch on the event loop when the model is idle and it should take at most this many "
        "microseconds (saves two thread hand-offs); 0: always in a worker thread",
    ),
    ("--keepalive-timeout", _number(float, 0.001), 75.0, "seconds before an idle keep-alive connection closes"),
    (
        "--request-timeout",
        _number(float, 0.001),
        10.0,
        "seconds a partly received request may go without new bytes before it gets 408",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``mtlib-serve`` arguments (each value checked as it is read)."""
    parser = _Parser(
        prog=PROG, description="Open Inference Protocol (KServe v2) server for a Triton-layout ONNX repository"
    )
    parser.add_argument(
        "--model-repository", required=True, type=Path, help="REPO/NAME/{config.pbtxt,VERSION/model.onnx}"
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    for flag, kind, default, text in _NUMBERS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--http-server",
        default="builtin",
        choices=list(HTTP_SERVERS),
        help="HTTP implementation: the built-in HTTP/1.1 protocol (the default: as fast as uvicorn, more robust; "
        "see the README), aiohttp, or uvicorn (an ASGI app on uvicorn with httptools); all run on uvloop when "
        "installed",
    )
    parser.add_argument(
        "--model-control-mode",
        default="none",
        choices=list(CONTROL_MODES),
        help="none: serve the repository as loaded at start, refuse load/unload (default); poll: also rescan it "
        "every --repository-poll-secs; explicit: enable the load/unload API",
    )
    parser.add_argument(
        "--control-token",
        default=None,
        help=f"with explicit: load/unload requests must send it (Authorization: Bearer TOKEN); default ${TOKEN_ENV}",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _user_error(err: Exception, message: str) -> NoReturn:
    """Exit with status 2 and ``mtlib-serve: error: message``; ``MTLIB_DEBUG=1``: raise ``err`` with its traceback.
    Call it from the ``except`` block that caught ``err``."""
    if debugging():
        raise err
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def parse_args(argv: list[str] | None = None) -> tuple[ServerOptions, str]:
    """The server's options and the log level from the command line (exit status 2 on a user mistake)."""
    args = build_parser().parse_args(argv)
    try:
        check_repository(args.model_repository)
    except RepositoryError as err:
        _user_error(err, f"--model-repository {err}")
    options = ServerOptions(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        max_body_size=args.max_body_size,
        poll_interval_s=args.repository_poll_secs,
        shutdown_timeout_s=args.shutdown_timeout,
        inline_max_us=args.inline_max_us,
        http_server=args.http_server,
        keepalive_timeout_s=args.keepalive_timeout,
        request_timeout_s=args.request_timeout,
        model_control_mode=args.model_control_mode,
        control_token=args.control_token if args.control_token is not None else os.environ.get(TOKEN_ENV) or None,
    )
    if options.model_control_mode == "explicit" and options.control_token is None and options.host not in _LOCAL:
        log.warning(
            "--model-control-mode explicit on %s without --control-token: anyone who reaches the port can load and "
            "unload models",
            options.host,
        )
    return options, args.log_level


def _run(main: Any) -> None:
    """``asyncio.run`` on uvloop's event loop when uvloop is installed (the ``serve`` extra brings it; every front
    end and gRPC run on it, measured faster in ``benchmarks/serving.py``), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> None:
    """Console script ``mtlib-serve``."""
    options, level = parse_args(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        _run(serve(options))
    except ListenError as err:
        _user_error(err, str(err))


if __name__ == "__main__":
    main()
