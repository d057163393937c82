"""Every endpoint of the server, independent of the HTTP implementation: :class:`InferenceService` takes a
request as ``(method, path, headers, body)``, routes it by path, and answers a :class:`Reply` (status, body,
the few headers the protocol needs). The front ends (:mod:`serving.http_builtin`, :mod:`serving.http_aiohttp`)
parse HTTP, call :meth:`InferenceService.handle` and write the :class:`Reply` back; the service asks
:class:`~serving.models.ModelManager` which model version serves a request, decodes and encodes tensors with
:mod:`serving.protocol`, and counts into :mod:`serving.metrics`. Whatever goes wrong with a request becomes
``{"error": message}`` with a 4xx status here (5xx only for the server's own failures), and the server keeps
serving.

Endpoints (KServe ``docs/predict-api/v2/required_api.md`` plus Triton's repository, configuration and binary
tensor extensions, so an unmodified ``tritonclient.http.InferenceServerClient`` works)::

    GET  /v2/health/live                     200 while the process runs
    GET  /v2/health/ready                    200 once every model in the repository serves a version
    GET  /v2                                 server metadata: name, version, extensions
    GET  /v2/models/{m}[/versions/{v}]       model metadata (shapes with -1 for the batch axis)
    GET  /v2/models/{m}[/versions/{v}]/ready 200 if that version serves
    GET  /v2/models/{m}[/versions/{v}]/config
    POST /v2/models/{m}[/versions/{v}]/infer
    POST /v2/repository/index                every model and version with its state (and why it is not READY)
    POST /v2/repository/models/{m}/load      (re)load a model now; also undoes an unload
    POST /v2/repository/models/{m}/unload    stop serving a model (in-flight requests finish first)
    GET  /metrics                            Prometheus text format, Triton metric names
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.batching import BatcherClosed
from serving.metrics import CONTENT_TYPE
from serving.models import ModelManager, ModelVersion
from serving.options import ServerOptions
from serving.protocol import (
    InferenceError,
    InferRequest,
    Signature,
    decompress,
    encode_infer_response,
    error_body,
    json_dumps,
    parse_infer_request,
)

log = logging.getLogger("mtlib.serve")

SERVER_NAME = "mtlib"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration"]


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("mtlib")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "0.1.0"


_JSON = "application/json"
_BINARY = "application/octet-stream"


@dataclass(slots=True)
class Reply:
    """An HTTP answer as the front ends send it."""

    status: int
    body: Any = b""  # bytes-like
    content_type: str | None = _JSON
    header_length: int | None = None  # Inference-Header-Content-Length, when binary tensors follow the JSON
    allow: str | None = None  # the Allow header of a 405


_EMPTY_OK = Reply(200, b"", None)


def _json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply(status, json_dumps(payload).encode())


def control_token(headers: Any) -> str | None:
    """The model-control token a request carries: ``Authorization: Bearer <token>`` or ``mtlib-control-token``."""
    get = headers.get if hasattr(headers, "get") else dict(headers).get
    auth = get("authorization") or get("Authorization")
    if isinstance(auth, str) and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    token = get("mtlib-control-token") or get("Mtlib-Control-Token")
    return token.strip() if isinstance(token, str) else None


def error_reply(message: str, status: int) -> Reply:
    """``{"error": message}`` with ``status``, the answer to every failed request."""
    return Reply(status, error_body(message))


LINGER_S = 5.0
"""After refusing a request whose body is still arriving, how long a front end keeps reading (and discarding)
it before it closes the connection: closing with unread bytes would reset it before the client read the answer."""


def too_large(limit: int, length: int | None = None) -> str:
    """The 413 message for a body over ``limit`` bytes (``length``: its declared size, when there is one)."""
    body = "request body" if length is None else f"request body of {length} bytes is"
    return f"{body} larger than the limit of {limit} bytes (--max-body-size)"


class InferenceService:
    """Every endpoint, independent of the HTTP implementation: ``handle(method, path, headers, body)``.

    ``headers`` maps lower-case names to values (a case-insensitive mapping works too). Each front end
    reads the whole body (within ``--max-body-size``) before calling :meth:`handle`; everything that can go
    wrong becomes ``{"error": message}`` with its status here.
    """

    def __init__(self, manager: ModelManager, options: ServerOptions) -> None:
        self.manager = manager
        self.metrics = manager.metrics
        self.max_body = options.max_body_size
        self.control_mode = options.model_control_mode
        self._control_token = options.control_token
        self.in_flight = 0
        self.stopping = False
        self._server_metadata = json_dumps(
            {"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS}
        ).encode()

    async def handle(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        self.in_flight += 1
        try:
            if path.startswith("/v2/models/"):
                return await self._model_endpoint(method, path, headers, body)
            return await self._other_endpoint(method, path, headers, body)
        except InferenceError as err:
            return error_reply(str(err), err.status)
        except Exception as err:
            log.exception("unhandled error in %s %s", method, path)
            return error_reply(f"internal server error: {type(err).__name__}: {err}", 500)
        finally:
            self.in_flight -= 1

    async def _model_endpoint(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        parts = path[11:].split("/")
        name, version, rest = parts[0], None, parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else "" if not rest else None
        if not name or version == "" or action is None:
            return error_reply(f"no endpoint {method} {path}", 404)
        if action == "infer":
            if method != "POST":
                return self._not_allowed(method, path, "POST")
            return await self.infer(name, version, headers, body)
        if action not in ("", "ready", "config"):
            return error_reply(f"no endpoint {method} {path}", 404)
        if method not in ("GET", "HEAD"):
            return self._not_allowed(method, path, "GET")
        mv = self.manager.get(name, version)  # 404, saying why, unless that version serves
        if action == "ready":
            return _EMPTY_OK
        if action == "config":
            return _json_reply(mv.config_json())
        meta = mv.metadata()
        if version is None:
            meta["versions"] = [str(v) for v in self.manager.ready_versions(name)]
        return _json_reply(meta)

    def check_control(self, token: str | None) -> None:
        """Refuse (403) a load or unload request unless the server runs with ``model_control_mode=explicit`` and the
        request carries the control token (when one is set). Both protocols call it."""
        if self.control_mode != "explicit":
            raise InferenceError(
                f"model control is off (--model-control-mode {self.control_mode}); start the server with "
                "--model-control-mode explicit to load and unload models through the API",
                403,
            )
        expected = self._control_token
        if expected is not None and not (token is not None and hmac.compare_digest(token.encode(), expected.encode())):
            what = "no control token" if not token else "a wrong control token"
            raise InferenceError(
                f"load/unload refused: the request carries {what} (send 'Authorization: Bearer <token>' or "
                "'mtlib-control-token: <token>')",
                403,
            )

    async def _other_endpoint(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        path = path.rstrip("/") or "/"
        if path.startswith("/v2/repository/"):
            parts = path[15:].split("/")
            if parts == ["index"]:
                if method != "POST":
                    return self._not_allowed(method, path, "POST")
                entries = self.manager.index()
                if _json_params(body, "index").get("ready"):
                    entries = [e for e in entries if e.get("state") == "READY"]
                return _json_reply(entries)
            if len(parts) == 3 and parts[0] == "models" and parts[1] and parts[2] in ("load", "unload"):
                if method != "POST":
                    return self._not_allowed(method, path, "POST")
                self.check_control(control_token(headers))
                params = _json_params(body, parts[2])
                if parts[2] == "unload":
                    await self.manager.unload(parts[1])
                    return Reply(200, b"{}")
                overrides = params.get("parameters")
                if isinstance(overrides, dict) and overrides:
                    raise InferenceError(
                        f"load with parameters {sorted(overrides)} (a config or file override) is not supported; "
                        "write the model into the repository instead"
                    )
                await self.manager.load(parts[1])
                return Reply(200, b"{}")
            return error_reply(f"no endpoint {method} {path}", 404)
        if path not in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
            return error_reply(f"no endpoint {method} {path}", 404)
        if method not in ("GET", "HEAD"):
            return self._not_allowed(method, path, "GET")
        if path == "/v2/health/live":
            return _EMPTY_OK
        if path == "/v2/health/ready":
            if self.stopping:
                return error_reply("server is shutting down", 503)
            if not self.manager.ready:
                return error_reply(
                    "not every model in the repository serves a version; see POST /v2/repository/index", 503
                )
            return _EMPTY_OK
        if path == "/v2":
            return Reply(200, self._server_metadata)
        return Reply(200, self.metrics.render().encode(), CONTENT_TYPE)

    @staticmethod
    def _not_allowed(method: str, path: str, allowed: str) -> Reply:
        return Reply(405, error_body(f"{method} is not allowed on {path}; use {allowed}"), allow=allowed)

    async def infer(self, name: str, version: str | None, headers: Any, body: bytes) -> Reply:
        """``POST /v2/models/{name}[/versions/{version}]/infer``."""
        encoding = headers.get("content-encoding")
        header_length = headers.get("inference-header-content-length")

        def parse(sig: Signature) -> InferRequest:
            raw = decompress(body, encoding, self.max_body) if encoding is not None else body
            return parse_infer_request(raw, header_length, sig)

        try:
            payload, json_length = await self.run_infer(name, version, parse, _encode_http)
        except InferenceError as err:
            return error_reply(str(err), err.status)
        if json_length is None:
            return Reply(200, payload)
        return Reply(200, payload, _BINARY, json_length)

    async def run_infer(
        self,
        name: str,
        version: str | None,
        parse: Callable[[Signature], InferRequest],
        encode: Callable[[ModelVersion, InferRequest, list[Any]], Any],
    ) -> Any:
        """One inference for either protocol: ``parse`` validates the request against the version's signature,
        the version's dynamic batcher runs it, ``encode`` turns the output arrays into the protocol's answer
        (returned). Counts the request in the version's statistics; failures raise :class:`InferenceError`
        (404 unknown model or version, 400 bad request, 503 unloaded while waiting)."""
        start = time.perf_counter_ns()
        mv = self.manager.get(name, version)  # no await from here to the batcher: a retired version gets nothing new
        stats = mv.stats
        try:
            req = parse(mv.signature)
            key = tuple(a.shape[1:] for a in req.inputs.values()) if mv.signature.variable else ()
            arrays, timing = await mv.batcher.infer(req.inputs, req.rows, req.outputs, key)
            out_start = time.perf_counter_ns()
            answer = encode(mv, req, arrays)
        except InferenceError:
            stats.failure += 1
            raise
        except BatcherClosed:
            stats.failure += 1
            raise InferenceError(
                f"model {mv.name!r} version {mv.version} was unloaded while the request waited; retry", 503
            ) from None
        end = time.perf_counter_ns()
        stats.success += 1
        stats.count += req.rows
        stats.queue_ns += timing[0]
        stats.compute_input_ns += timing[1]
        stats.compute_infer_ns += timing[2]
        stats.compute_output_ns += end - out_start
        stats.request_ns += end - start
        return answer


def _encode_http(mv: ModelVersion, req: InferRequest, arrays: list[Any]) -> tuple[bytes, int | None]:
    datatypes = mv.datatypes
    return encode_infer_response(
        mv.name, mv.version_str, req.id, req.outputs, arrays, [datatypes[n] for n in req.outputs], req.binary
    )


def _json_params(body: bytes, what: str) -> dict[str, Any]:
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError as err:
        raise InferenceError(f"malformed JSON in the {what} request: {err}") from None
    if not isinstance(params, dict):
        raise InferenceError(f"the {what} request must be a JSON object, got {type(params).__name__}")
    return params
