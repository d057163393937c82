"""Robustness of ``mtlib-serve``'s HTTP front end: malformed requests, generated (hypothesis) and mutated from valid
ones, sent over raw sockets to a live server. Each gets a status below 500 (with a JSON error for a 4xx) or, for
bytes that are no HTTP at all, a closed connection, within a bounded time; after each the server still passes a
health check. ``MTLIB_FUZZ_EXAMPLES=N`` runs more examples (before releases)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import DENSE_BIN, F3, I4, IDS_BIN, Running, models, repo  # noqa: F401 - fixtures

from serving.options import ServerOptions

EXAMPLES = int(os.environ.get("MTLIB_FUZZ_EXAMPLES", "60"))
READ_TIMEOUT = 10.0
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Running]:  # noqa: F811 - the imported fixture
    running = Running(
        ServerOptions(repo, host="127.0.0.1", port=0, max_body_size=1 << 16, poll_interval_s=0, shutdown_timeout_s=1,
                      keepalive_timeout_s=2)
    )  # fmt: skip
    yield running
    running.stop()


def send(server: Running, data: bytes, half_close: bool = True) -> bytes:
    """Everything the server answers to ``data`` on one connection: closed for writing after ``data``, or (a
    complete request, ``half_close=False``) kept open as a keep-alive client would, reading the first response."""
    with socket.create_connection(("127.0.0.1", server.server.port), timeout=READ_TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (a refused head): what it sent is still readable
            pass
        chunks = []
        while True:
            if not half_close and _complete(b"".join(chunks)):
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {READ_TIMEOUT} s to {data[:200]!r}") from None
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def check(server: Running, data: bytes, complete: bool = False) -> None:
    """``complete``: ``data`` is a whole request, which must be answered without the client closing its side."""
    answer = send(server, data, half_close=not complete)
    if complete:
        assert answer, data[:300]
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        for response in answer.split(b"HTTP/1.1 ")[1:]:
            status = int(response[:3])
            assert status < 500, (data[:300], response[:300])
            if status >= 400:
                head, _, body = response.partition(b"\r\n\r\n")
                if b"content-type: application/json" in head.lower() and body:
                    assert "error" in json.loads(body[: int(_length(head))] if _length(head) else body)
    health = send(server, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200"), health[:200]


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    return bool(sep) and len(body) >= (_length(head) or 0)


def _length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return None


def _request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    head = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n" + body


def valid_binary() -> tuple[bytes, int]:
    header = json.dumps({"inputs": [DENSE_BIN, IDS_BIN]}).encode()
    return header + F3 + I4, len(header)


# ------------------------------------------------------------------------------------------------ strategies

_PATHS = st.sampled_from(
    [b"/v2/models/tiny/infer", b"/v2/models/tiny/versions/1/infer", b"/v2/models/tiny", b"/v2/models/nope/infer",
     b"/v2/repository/index", b"/v2/repository/models/tiny/load", b"/v2", b"/metrics", b"/v2/models//infer",
     b"/v2/models/tiny/versions/x/infer", b"/%ff%fe", b"/v2/models/" + b"a" * 5000 + b"/infer", b"*", b""]
)  # fmt: skip
_METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"BREW", b"", b"G\x00T"])
_HEADER_VALUES = st.one_of(
    st.integers(-5, 1 << 40).map(lambda i: str(i).encode()),
    st.sampled_from([b"", b"chunked", b"gzip", b"deflate", b"abc", b"1, 2", b"0x10", b" 12 ", b"\xff\xfe"]),
    st.binary(max_size=40),
)
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Inference-Header-Content-Length",
                         b"Content-Encoding", b"Content-Type", b"Connection", b"Expect", b"X" * 10, b""]),
        _HEADER_VALUES,
    ),
    max_size=5,
)  # fmt: skip
_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10))
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
_TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(["dense", "ids", "nope", "", "x" * 300]),
     "shape": st.one_of(st.lists(st.integers(-3, 10**12), max_size=4), _JSON),
     "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "FP16", "BOOL", "UINT8", "fp32", "", "COMPLEX"]),
     "data": st.one_of(st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)), max_size=8),
                       _JSON)},
    optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), _JSON_LEAF, max_size=2)},
)  # fmt: skip
_V2_BODY = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(_TENSOR, max_size=3)},
                          optional={"outputs": _JSON, "parameters": _JSON, "id": _JSON}),
    _JSON,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ tests


@FUZZ
@given(method=_METHODS, path=_PATHS, headers=_HEADERS, body=st.binary(max_size=300))
def test_generated_http_requests_never_get_a_5xx(server: Running, method, path, headers, body) -> None:
    check(server, _request(method, path, headers, body))


@FUZZ
@given(body=_V2_BODY, binary_tail=st.binary(max_size=64), declare=st.booleans())
def test_generated_v2_bodies_never_get_a_5xx(server: Running, body, binary_tail: bytes, declare: bool) -> None:
    payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(payload + binary_tail)).encode())]
    if declare:
        headers.append((b"Inference-Header-Content-Length", str(len(payload)).encode()))
    check(server, _request(b"POST", b"/v2/models/tiny/infer", headers, payload + binary_tail), complete=True)


@FUZZ
@given(data=st.data())
def test_mutated_valid_requests_never_get_a_5xx(server: Running, data: st.DataObject) -> None:
    body, json_len = valid_binary()
    headers = [(b"Content-Length", str(len(body)).encode())]
    headers.append((b"Inference-Header-Content-Length", str(json_len).encode()))
    raw = bytearray(_request(b"POST", b"/v2/models/tiny/infer", headers, body))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "header_length", "body_length"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "insert":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=20))
    else:
        delta = data.draw(st.integers(-40, 40).filter(bool))
        name = b"Inference-Header-Content-Length" if kind == "header_length" else b"Content-Length"
        value = json_len if kind == "header_length" else len(body)
        old, new = name + b": " + str(value).encode(), name + b": " + str(value + delta).encode()
        raw = bytearray(bytes(raw).replace(old, new))
    check(server, bytes(raw))


def test_deep_json_and_huge_heads_are_refused_not_crashed(server: Running) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    check(server, _request(b"POST", b"/v2/models/tiny/infer", [(b"Content-Length", str(len(deep)).encode())], deep))
    nested = json.dumps({"inputs": [{"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [[[[1.0]]]] * 3}]})
    check(server, _request(b"POST", b"/v2/models/tiny/infer", [(b"Content-Length", str(len(nested)).encode())],
                           nested.encode()))  # fmt: skip
    check(server, b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    check(server, b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n")
    check(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))  # a TLS ClientHello


@pytest.mark.parametrize(
    "raw",
    [
        b"HEAD /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Encoding: gzip\r\n\r\nabcd",
        b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /v2 HTTP/1.0\r\n\r\n",
        b"GET /v2/models/tiny HTTP/1.1\r\nHost: t\r\n\r\nGET /v2/models/nope HTTP/1.1\r\nHost: t\r\n\r\n",
    ],
)
def test_complete_odd_requests_are_answered_without_waiting(server: Running, raw: bytes) -> None:
    check(server, raw, complete=True)


@pytest.mark.parametrize(
    ("raw", "status", "fragment", "prompt"),
    [
        (b"GET /v2/health/live HTTP/1.1\nHost: t\n\n", 200, b"", True),  # bare LF line ends (RFC 9112, 2.2)
        (b"GET /v2/health/live HTTP/1.1\r\nHost: t\n\r\n", 200, b"", True),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, 400, b"TLS handshake", True),
        (b"GET /v2/health/live HTTP/1.1\rHost: t\r\r", 408, b"incomplete request head", False),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n", 408, b"incomplete request head", False),
        (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc", 408, b"request body",
         False),
        (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", 408,
         b"request body", False),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-A: b\rc\r\n\r\n", 400, b"bare CR", True),
    ],
    ids=["lf", "mixed-lf", "tls", "cr-only", "head-stops", "body-stops", "chunks-stop", "bare-cr"],
)  # fmt: skip
def test_requests_that_stop_or_bend_the_framing_are_answered_in_bounded_time(
    repo: Path, raw: bytes, status: int, fragment: bytes, prompt: bool  # noqa: F811 - the imported fixture
) -> None:
    """The client keeps its side open (as a stalled or odd client would): the answer comes at once for a complete
    or unparseable request, and as a 408 after --request-timeout for one that stopped arriving, never only at the
    keep-alive timeout (here 60 s)."""
    running = Running(
        ServerOptions(repo, host="127.0.0.1", port=0, poll_interval_s=0, shutdown_timeout_s=1,
                      keepalive_timeout_s=60, request_timeout_s=0.5)
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(raw)
            answer = b""
            while not _complete(answer):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            waited = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
        assert fragment in answer, answer[:400]
        assert waited < (1.0 if prompt else 5.0), waited
        health = send(running, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200"), health[:200]
    finally:
        running.stop()
