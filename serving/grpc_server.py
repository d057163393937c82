"""The gRPC front end: KServe v2 / Triton's ``inference.GRPCInferenceService`` on ``grpc.aio``, in the same
process and event loop as HTTP, over the same :class:`~serving.endpoints.InferenceService` (so the same model
manager, dynamic batchers, validation, statistics and control checks).

The service definitions are the ones ``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``); an unmodified ``tritonclient.grpc.InferenceServerClient`` works.

Every method reuses the HTTP code path rather than a copy of it:

* ``ModelInfer`` turns the request into the decoded header of the HTTP request it stands for (the inputs of
  ``raw_input_contents`` as binary tensors with ``binary_data_size``, typed ``contents`` as JSON ``data``, every
  requested output binary; no JSON text is written or parsed) and runs it through
  :meth:`InferenceService.run_infer`, the HTTP path's own, whose :func:`~serving.protocol.parse_infer_header`
  validates names, datatypes, shapes and sizes with the same messages; the output arrays go straight into
  ``raw_output_contents``. The answer is therefore the HTTP path's, bit for bit.
* ``ModelMetadata``, ``ModelConfig``'s routing, ``RepositoryModelLoad`` / ``Unload`` go through
  :meth:`InferenceService.handle` (load and unload hence through :meth:`InferenceService.check_control`, with
  the token from the metadata ``authorization: Bearer <token>`` or ``mtlib-control-token``).
* ``ModelConfig`` is Triton's ``ModelConfig`` proto parsed (``google.protobuf.text_format``) from the
  ``config.pbtxt`` text of the loaded config (:func:`serving.repository.format_config`), plus ``backend``.
* ``ModelStatistics`` reports the counters of :class:`serving.metrics.InferenceStats`: success, fail, queue,
  compute_input / compute_infer / compute_output (count and cumulative ns), ``inference_count`` and
  ``execution_count``; ``last_inference``, cache hits and misses, ``batch_stats``, ``memory_usage`` and
  ``response_stats`` are not counted and stay zero / empty; ``fail.ns`` is 0 (failure time is not counted).

A failed request is aborted with the status code of its HTTP status: 400 -> INVALID_ARGUMENT, 403 ->
PERMISSION_DENIED, 404 -> NOT_FOUND (UNAVAILABLE when the model exists but serves no version now, e.g.
unloaded), 413 -> RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE; anything unexpected is logged and INTERNAL. Messages
over ``--max-body-size`` are refused by gRPC itself with RESOURCE_EXHAUSTED. Shared memory, trace and
log settings answer UNIMPLEMENTED. ``ModelStreamInfer`` runs each request of the stream as ``ModelInfer`` does,
concurrently, answering each (or its ``error_message``) when ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from serving.endpoints import InferenceService, Reply
from serving.models import check_model_name
from serving.options import ServerOptions
from serving.protocol import (
    InferenceError,
    InferRequest,
    Signature,
    bytes_to_binary,
    json_dumps,
    parse_infer_header,
)
from serving.repository import format_config

log = logging.getLogger("mtlib.serve")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}

# The typed ``InferTensorContents`` field of each datatype (FP16 has none: it goes in raw_input_contents).
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

STOP_LINGER_S = 0.1
"""On stop, how long new calls are still received (and answered UNAVAILABLE) before the port closes."""

_UNIMPLEMENTED = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


class _Abort(Exception):
    """A request refused with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _reply_error(reply: Reply) -> _Abort:
    try:
        message = json.loads(bytes(reply.body))["error"]
    except Exception:
        message = f"request failed with HTTP status {reply.status}"
    return _abort_for(reply.status, message)


def _abort_for(status: int, message: str) -> _Abort:
    code = _CODES.get(status)
    if code is None:
        if status >= 500:
            log.error("gRPC request failed with status %d: %s", status, message)
        code = grpc.StatusCode.INTERNAL
    return _Abort(code, message)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _typed_data(tensor: Any) -> list[Any]:
    """The typed ``contents`` of an input as the JSON ``data`` list the HTTP parser validates."""
    datatype = tensor.datatype
    field = _TYPED_FIELD.get(datatype)
    contents = tensor.contents
    used = [f.name for f, _ in contents.ListFields()]
    if field is None:
        if datatype == "FP16":
            raise InferenceError(
                f"input {tensor.name!r}: FP16 has no typed contents field; send it in raw_input_contents"
            )
        return []  # the datatype check names what was expected
    other = [f for f in used if f != field]
    if other:
        raise InferenceError(f"input {tensor.name!r}: datatype {datatype} takes {field}, got {', '.join(other)}")
    values = getattr(contents, field)
    if datatype != "BYTES":
        return list(values)
    out = []
    for i, v in enumerate(values):
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InferenceError(
                f"input {tensor.name!r}: BYTES element {i} is not UTF-8 ({err.reason}); ONNX string tensors hold text"
            ) from None
    return out


def infer_header(request: Any) -> tuple[dict[str, Any], bytes]:
    """The decoded JSON header and binary body of the HTTP inference request a ``ModelInferRequest`` stands for:
    raw inputs as binary tensors (``binary_data_size``), typed contents as JSON ``data``, every output binary.
    :func:`serving.protocol.parse_infer_header` validates it with the HTTP path's rules and messages."""
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InferenceError(
            f"the request has {len(inputs)} inputs but {len(raw)} raw_input_contents; "
            "send one raw_input_contents entry per input, or typed contents for every input"
        )
    items: list[dict[str, Any]] = []
    for i, tensor in enumerate(inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.parameters and "shared_memory_region" in tensor.parameters:
            raise InferenceError(f"input {tensor.name!r}: shared memory is not supported by this server; send the data")
        if raw:
            if tensor.HasField("contents"):
                raise InferenceError(f"input {tensor.name!r} has both typed contents and raw_input_contents")
            item["parameters"] = {"binary_data_size": len(raw[i])}
        else:
            item["data"] = _typed_data(tensor)
        items.append(item)
    header: dict[str, Any] = {"inputs": items}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        outputs = []
        for out in request.outputs:
            params: dict[str, Any] = {"binary_data": True}
            if out.parameters:
                for key in ("shared_memory_region", "classification"):
                    if key in out.parameters:
                        params[key] = True
            outputs.append({"name": out.name, "parameters": params})
        header["outputs"] = outputs
    else:
        header["parameters"] = {"binary_data_output": True}
    body = (raw[0] if len(raw) == 1 else b"".join(raw)) if raw else b""
    return header, body


def _parse(request: Any) -> Callable[[Signature], InferRequest]:
    header, body = infer_header(request)
    return lambda sig: parse_infer_header(header, body, 0, sig)


def _encode(mv: Any, req: InferRequest, arrays: list[np.ndarray]) -> Any:
    """The ``ModelInferResponse`` of the output arrays: every output in ``raw_output_contents``."""
    response = service_pb2.ModelInferResponse(model_name=mv.name, model_version=mv.version_str)
    if req.id is not None:
        response.id = str(req.id)
    datatypes = mv.datatypes
    raw = response.raw_output_contents
    for name, arr in zip(req.outputs, arrays):
        datatype = datatypes[name]
        response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw.append(bytes_to_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes())
    return response


class GrpcInferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's ``GRPCInferenceService`` over an :class:`InferenceService`."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.manager = service.manager
        self.in_flight = 0

    async def _http(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
        reply = await self.service.handle(method, path, headers or {}, body)
        if reply.status != 200:
            raise _reply_error(reply)
        return json.loads(bytes(reply.body)) if reply.body else {}

    def _model_path(self, name: str, version: str) -> str:
        check_model_name(name)
        if version and not version.isdigit():
            raise InferenceError(f"model {name!r}: version must be a non-negative integer, got {version!r}", 404)
        return f"/v2/models/{name}" + (f"/versions/{version}" if version else "")

    def _get(self, name: str, version: str) -> Any:
        """The serving version, 404 (NOT_FOUND) if the model or version is unknown, UNAVAILABLE if the model is in
        the repository but serves no version now."""
        check_model_name(name)
        try:
            return self.manager.get(name, version or None)
        except InferenceError as err:
            if err.status == 404 and not version and any(e.get("name") == name for e in self.manager.index()):
                raise InferenceError(str(err), 503) from None
            raise

    # ---- health and metadata

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.manager.ready and not self.service.stopping)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self._get(request.name, request.version)
        except InferenceError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = await self._http("GET", "/v2")
        return json_format.ParseDict(meta, service_pb2.ServerMetadataResponse(), ignore_unknown_fields=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = await self._http("GET", self._model_path(request.name, request.version))
        return json_format.ParseDict(meta, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        mv = self._get(request.name, request.version)
        config = text_format.Parse(format_config(mv.cfg), model_config_pb2.ModelConfig())
        config.backend = "onnxruntime"
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if request.name:
            versions = [self._get(request.name, request.version)]
        else:
            versions = []
            for entry in self.manager.index():
                if entry.get("state") == "READY" and "version" in entry:
                    versions.append(self.manager.get(entry["name"], entry["version"]))
        response = service_pb2.ModelStatisticsResponse()
        for mv in versions:
            s = mv.stats
            duration = service_pb2.StatisticDuration
            response.model_stats.add(
                name=mv.name,
                version=mv.version_str,
                inference_count=s.count,
                execution_count=s.exec_count,
                inference_stats=service_pb2.InferStatistics(
                    success=duration(count=s.success, ns=s.request_ns),
                    fail=duration(count=s.failure, ns=0),
                    queue=duration(count=s.success, ns=s.queue_ns),
                    compute_input=duration(count=s.success, ns=s.compute_input_ns),
                    compute_infer=duration(count=s.success, ns=s.compute_infer_ns),
                    compute_output=duration(count=s.success, ns=s.compute_output_ns),
                ),
            )
        return response

    # ---- inference

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._infer(request)

    async def _infer(self, request: Any) -> Any:
        self._get(request.model_name, request.model_version)  # NOT_FOUND / UNAVAILABLE before decoding anything
        return await self.service.run_infer(request.model_name, request.model_version or None, _parse(request), _encode)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Triton's bidirectional stream: every request on it runs as ModelInfer does, concurrently (so requests
        of one stream batch together), and its answer is sent when ready, matched by ``id``. A failed request
        answers ``error_message`` (with the request's ``id`` and model) and the stream goes on."""
        self.in_flight += 1
        try:
            if self.service.stopping:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another instance")
            answers: asyncio.Queue[Any] = asyncio.Queue()
            reader = asyncio.ensure_future(self._read_stream(request_iterator, answers))
            try:
                while (answer := await answers.get()) is not None:
                    yield answer
            finally:
                reader.cancel()
        finally:
            self.in_flight -= 1

    async def _read_stream(self, request_iterator: Any, answers: asyncio.Queue[Any]) -> None:
        running: set[asyncio.Future[None]] = set()

        async def one(request: Any) -> None:
            try:
                answer = service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request))
            except InferenceError as err:
                answer = self._stream_error(request, str(err))
            except Exception as err:
                log.exception("unhandled error in gRPC ModelStreamInfer")
                answer = self._stream_error(request, f"internal server error: {type(err).__name__}: {err}")
            await answers.put(answer)

        try:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            await answers.put(None)

    @staticmethod
    def _stream_error(request: Any, message: str) -> Any:
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return service_pb2.ModelStreamInferResponse(error_message=message, infer_response=response)

    # ---- repository

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        body = json_dumps({"ready": True}).encode() if request.ready else b""
        entries = await self._http("POST", "/v2/repository/index", body=body)
        response = service_pb2.RepositoryIndexResponse()
        for e in entries:
            response.models.add(
                name=e["name"], version=e.get("version", ""), state=e.get("state", ""), reason=e.get("reason", "")
            )
        return response

    async def _control(self, action: str, request: Any, context: Any) -> None:
        check_model_name(request.model_name)
        headers = _metadata(context)
        params = {k: json_format.MessageToDict(v) for k, v in request.parameters.items()}
        body = json_dumps({"parameters": params} if params else {}).encode()
        await self._http("POST", f"/v2/repository/models/{request.model_name}/{action}", headers, body)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await self._control("load", request, context)
        return service_pb2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._control("unload", request, context)
        return service_pb2.RepositoryModelUnloadResponse()


def _guard(method: Any) -> Any:
    """Run a servicer method, aborting with the status code its failure maps to."""

    health = method.__name__ in ("ServerLive", "ServerReady")

    async def call(self: GrpcInferenceServicer, request: Any, context: Any) -> Any:
        self.in_flight += 1
        try:
            if self.service.stopping and not health:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another instance")
            return await method(self, request, context)
        except _Abort as err:
            await context.abort(err.code, str(err))
        except InferenceError as err:
            err2 = _abort_for(err.status, str(err))
            await context.abort(err2.code, str(err2))
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            log.exception("unhandled error in gRPC %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(err).__name__}: {err}")
        finally:
            self.in_flight -= 1

    call.__name__ = method.__name__
    return call


def _unimplemented(name: str) -> Any:
    async def call(self: GrpcInferenceServicer, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")

    call.__name__ = name
    return call


for _name in (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "ModelInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
):
    setattr(GrpcInferenceServicer, _name, _guard(getattr(GrpcInferenceServicer, _name)))
for _name in _UNIMPLEMENTED:
    setattr(GrpcInferenceServicer, _name, _unimplemented(_name))


class GrpcServer:
    """The ``grpc.aio`` server on ``options.host:options.grpc_port`` (call from the event loop HTTP runs on)."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self._server: grpc.aio.Server | None = None
        self._servicer = GrpcInferenceServicer(service)

    async def start(self) -> int:
        """Listen and return the port; raises ``OSError`` (with the errno of a plain bind) if it cannot."""
        limit = self.options.max_body_size
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, server)
        host, port = self.options.host, self.options.grpc_port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        refused = _bind_error(host, port)  # before gRPC tries: its own failure is a C-core log line on stderr
        if refused is not None:
            raise refused
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as err:
            raise _bind_error(host, port) or OSError(str(err)) from err
        if not bound:
            raise _bind_error(host, port) or OSError(f"gRPC failed to bind {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, timeout: float) -> None:
        """Graceful: while in-flight calls finish (up to ``timeout`` seconds, and for at least ``STOP_LINGER_S``)
        new ones are answered UNAVAILABLE (``service.stopping`` is set), then the server stops; calls still running
        after ``timeout`` are cancelled. (A call that arrives as the port closes is cancelled by gRPC itself.)"""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout
        linger = start + min(STOP_LINGER_S, timeout)  # calls already on the wire get UNAVAILABLE, not CANCELLED
        while (self._servicer.in_flight or loop.time() < linger) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await self._server.stop(max(deadline - loop.time(), 0.0))
        self._server = None


def _bind_error(host: str, port: int) -> OSError | None:
    """Why gRPC cannot bind ``host:port``, found by binding a plain socket there (``None`` if that works)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    except OSError as err:
        return err
    return None
