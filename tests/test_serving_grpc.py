"""``mtlib-serve``'s gRPC front end (:mod:`serving.grpc_server`) against the unmodified ``tritonclient.grpc``
clients (sync and asyncio) on loopback, next to HTTP on the same server: health, metadata, config, inference
equal to the torch / ONNX Runtime reference and to the HTTP answer, typed and raw contents, status codes of
malformed requests, load / unload behind the control token, statistics, and 32 concurrent requests.

The repository and helpers are those of ``tests/test_server.py`` (imported, not copied).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as grpcaio  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from test_server import (  # noqa: E402
    Models,
    Running,
    bitwise_equal,
    export_tiny,
    local_session,
    random_request,
    text_model,
    tiny_config,
    torch_outputs,
    typed_and_text_configs,
    typed_model,
    write_version,
)
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.options import ServerOptions  # noqa: E402
from serving.repository import write_config  # noqa: E402

MAX_BODY = 1 << 20
TOKEN = "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    work = tmp_path_factory.mktemp("onnx")
    module_a, onnx_a = export_tiny(0, work)
    module_b, onnx_b = export_tiny(1, work)
    return Models(module_a, module_b, onnx_a, onnx_b)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("repo")
    for name in ("tiny", "spare"):
        write_config(root, tiny_config(name))
        write_version(root, name, 1, models.onnx_a)
    typed, text = typed_and_text_configs()
    for cfg, model in ((typed, typed_model()), (text, text_model())):
        write_config(root, cfg)
        write_version(root, cfg.name, 1, model)
    running = Running(
        ServerOptions(
            root,
            host="127.0.0.1",
            port=0,
            grpc_port=free_port(),
            max_body_size=MAX_BODY,
            poll_interval_s=0,
            shutdown_timeout_s=5,
            model_control_mode="explicit",
            control_token=TOKEN,
        )
    )
    running.grpc_url = f"127.0.0.1:{running.server.grpc_port}"  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture
def client(server: Running) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(server.grpc_url)  # type: ignore[attr-defined]
    yield c
    c.close()


@pytest.fixture
def stub(server: Running) -> Iterator[Any]:
    """The raw stub, for requests the client library would not build (typed contents, wrong sizes)."""
    channel = grpc.insecure_channel(server.grpc_url)  # type: ignore[attr-defined]
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def grpc_inputs(dense: np.ndarray, ids: np.ndarray) -> list[Any]:
    a = grpcclient.InferInput("dense", list(dense.shape), "FP32").set_data_from_numpy(dense)
    b = grpcclient.InferInput("ids", list(ids.shape), "INT64").set_data_from_numpy(ids)
    return [a, b]


def http_answer(server: Running, dense: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = httpclient.InferenceServerClient(server.url)
    try:
        inputs = []
        for name, arr, dt in (("dense", dense, "FP32"), ("ids", ids, "INT64")):
            inputs.append(httpclient.InferInput(name, list(arr.shape), dt).set_data_from_numpy(arr))
        result = c.infer("tiny", inputs)
        return result.as_numpy("p"), result.as_numpy("y")
    finally:
        c.close()


def code_of(call: Any) -> tuple[str, str]:
    """(status code name, message) of a call that must fail."""
    with pytest.raises((InferenceServerException, grpc.RpcError)) as info:
        call()
    err = info.value
    if isinstance(err, InferenceServerException):
        return str(err.status()).removeprefix("StatusCode."), err.message()
    return err.code().name, err.details()


# ------------------------------------------------------------------------------------------------------- tests


def test_health_metadata_and_config(client: Any, server: Running) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "7") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta.name == "mtlib" and "model_repository" in meta.extensions
    http = httpclient.InferenceServerClient(server.url)
    try:
        for name in ("tiny", "typed"):
            grpc_meta = json_format.MessageToDict(client.get_model_metadata(name), preserving_proto_field_name=True)
            http_meta = http.get_model_metadata(name)
            for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 shapes as strings
                for t in grpc_meta[tensors]:
                    t["shape"] = [int(d) for d in t["shape"]]
            assert grpc_meta == http_meta
            config = client.get_model_config(name).config
            assert isinstance(config, model_config_pb2.ModelConfig)
            assert config == json_format.ParseDict(http.get_model_config(name), model_config_pb2.ModelConfig())
    finally:
        http.close()
    config = client.get_model_config("tiny").config
    assert config.max_batch_size == 64 and config.backend == "onnxruntime"
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("dense", "TYPE_FP32", [3]),
        ("ids", "TYPE_INT64", [4]),
    ]
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("tiny", "1")] == "READY" and index[("typed", "1")] == "READY"


def test_infer_equals_torch_onnx_and_http(client: Any, server: Running, models: Models) -> None:
    rng = np.random.default_rng(11)
    session = local_session(models.onnx_a)
    for rows in (1, 5):
        dense, ids = random_request(rng, rows)
        result = client.infer("tiny", grpc_inputs(dense, ids), request_id="r-1")
        assert result.get_response().id == "r-1" and result.get_response().model_version == "1"
        p, y = result.as_numpy("p"), result.as_numpy("y")
        ref_p, ref_y = torch_outputs(models.module_a, dense, ids)
        np.testing.assert_allclose(p, ref_p, atol=1e-6)
        np.testing.assert_allclose(y, ref_y, atol=1e-6)
        onnx_p, onnx_y = session.run(["p", "y"], {"dense": dense, "ids": ids})
        assert bitwise_equal(p, onnx_p) and bitwise_equal(y, onnx_y)
        http_p, http_y = http_answer(server, dense, ids)
        assert bitwise_equal(p, http_p) and bitwise_equal(y, http_y)
    only_y = client.infer("tiny", grpc_inputs(dense, ids), outputs=[grpcclient.InferRequestedOutput("y")])
    assert [o.name for o in only_y.get_response().outputs] == ["y"] and only_y.as_numpy("p") is None
    assert bitwise_equal(only_y.as_numpy("y"), y)


def test_datatypes_raw_and_typed_contents(client: Any, stub: Any) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 2)).astype(np.float16)
    b = rng.integers(-1000, 1000, (3, 2)).astype(np.int32)
    c = rng.random((3, 2)) > 0.5
    inputs = [
        grpcclient.InferInput(n, [3, 2], dt).set_data_from_numpy(arr)
        for n, arr, dt in (("a", a, "FP16"), ("b", b, "INT32"), ("c", c, "BOOL"))
    ]
    result = client.infer("typed", inputs)
    assert bitwise_equal(result.as_numpy("a2"), a + a)
    assert bitwise_equal(result.as_numpy("b2"), b * 3)
    assert bitwise_equal(result.as_numpy("c2"), ~c)
    words = np.array([["héllo"], [""], ["naïve café"]], dtype=np.object_)
    as_bytes = np.array([[w.encode()] for w in words.ravel()], dtype=np.object_)
    text = grpcclient.InferInput("s", [3, 1], "BYTES").set_data_from_numpy(as_bytes)
    assert [v.decode() for v in client.infer("text", [text]).as_numpy("s_out").ravel()] == list(words.ravel())

    # typed contents (the client library always sends raw): same answers as raw
    dense, ids = random_request(rng, 2)
    request = service_pb2.ModelInferRequest(model_name="tiny")
    t = request.inputs.add(name="dense", datatype="FP32", shape=[2, 3])
    t.contents.fp32_contents.extend(dense.ravel().tolist())
    t = request.inputs.add(name="ids", datatype="INT64", shape=[2, 4])
    t.contents.int64_contents.extend(ids.ravel().tolist())
    typed = stub.ModelInfer(request, timeout=10)
    raw = client.infer("tiny", grpc_inputs(dense, ids)).get_response()
    assert list(typed.raw_output_contents) == list(raw.raw_output_contents)
    shapes = [(o.name, o.datatype, list(o.shape)) for o in typed.outputs]
    assert shapes == [("p", "FP32", [2, 1]), ("y", "FP32", [2, 1])]
    request = service_pb2.ModelInferRequest(model_name="text")
    t = request.inputs.add(name="s", datatype="BYTES", shape=[3, 1])
    t.contents.bytes_contents.extend(w.encode() for w in words.ravel())
    answer = stub.ModelInfer(request, timeout=10).raw_output_contents[0]
    assert answer == b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words.ravel())


def _tiny_request(**changes: Any) -> Any:
    """A raw-contents request for ``tiny`` (2 rows) with ``changes`` applied to its first input."""
    dense = np.ones((2, 3), np.float32)
    ids = np.zeros((2, 4), np.int64)
    request = service_pb2.ModelInferRequest(model_name=changes.pop("model", "tiny"))
    first = request.inputs.add(name="dense", datatype="FP32", shape=[2, 3])
    request.inputs.add(name="ids", datatype="INT64", shape=[2, 4])
    raw = [dense.tobytes(), ids.tobytes()]
    for key, value in changes.items():
        if key == "raw":
            raw[0] = value
        elif key == "shape":
            first.ClearField("shape")
            first.shape.extend(value)
        else:
            setattr(first, key, value)
    request.raw_input_contents.extend(raw)
    return request


@pytest.mark.parametrize(
    ("changes", "code", "fragments"),
    [
        ({"shape": [2, 4]}, "INVALID_ARGUMENT", ("'dense'", "expected shape [-1, 3]")),
        ({"datatype": "FP64"}, "INVALID_ARGUMENT", ("'dense'", "expected datatype FP32")),
        ({"name": "bogus"}, "INVALID_ARGUMENT", ("unknown input 'bogus'", "'dense'")),
        ({"raw": b"\0" * 20}, "INVALID_ARGUMENT", ("'dense'", "needs 24 bytes", "20")),
        ({"model": "nope"}, "NOT_FOUND", ("unknown model 'nope'",)),
        ({"model": "../x"}, "INVALID_ARGUMENT", ("invalid model name",)),
        ({"raw": b"\0" * (MAX_BODY + 1)}, "RESOURCE_EXHAUSTED", ()),
    ],
    ids=["shape", "datatype", "name", "raw-size", "unknown-model", "bad-name", "too-large"],
)
def test_malformed_requests_get_status_codes(
    stub: Any, client: Any, models: Models, changes: dict[str, Any], code: str, fragments: tuple[str, ...]
) -> None:
    got, message = code_of(lambda: stub.ModelInfer(_tiny_request(**changes), timeout=10))
    assert got == code, message
    for fragment in fragments:
        assert fragment in message, message
    dense, ids = random_request(np.random.default_rng(1), 1)  # and it keeps serving
    y = client.infer("tiny", grpc_inputs(dense, ids)).as_numpy("y")
    np.testing.assert_allclose(y, torch_outputs(models.module_a, dense, ids)[1], atol=1e-6)


def test_other_errors(stub: Any, client: Any) -> None:
    got, message = code_of(lambda: client.infer("tiny", grpc_inputs(*random_request(np.random.default_rng(2), 1)),
                                                model_version="9"))  # fmt: skip
    assert got == "NOT_FOUND" and "no ready version '9'" in message
    request = _tiny_request()
    request.outputs.add(name="zzz")
    got, message = code_of(lambda: stub.ModelInfer(request, timeout=10))
    assert got == "INVALID_ARGUMENT" and "unknown output 'zzz'" in message
    request = service_pb2.ModelInferRequest(model_name="tiny")
    t = request.inputs.add(name="dense", datatype="FP32", shape=[1, 3])
    t.contents.int_contents.extend([1, 2, 3])
    got, message = code_of(lambda: stub.ModelInfer(request, timeout=10))
    assert got == "INVALID_ARGUMENT" and "takes fp32_contents, got int_contents" in message
    got, message = code_of(lambda: client.get_model_metadata("nope"))
    assert got == "NOT_FOUND"
    got, _ = code_of(lambda: stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), timeout=10))
    assert got == "UNIMPLEMENTED"


def test_model_stream_infer(client: Any, server: Running, models: Models) -> None:
    """tritonclient.grpc's stream: every answer equals the HTTP answer to the same request, bit for bit, and the
    torch model's; a bad request on the stream gets its error and the stream goes on."""
    import queue

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    rng = np.random.default_rng(5)
    sent = {}
    try:
        for i in range(8):
            if i == 3:
                bad = [
                    grpcclient.InferInput("dense", [1, 4], "FP32").set_data_from_numpy(np.ones((1, 4), np.float32)),
                    grpcclient.InferInput("ids", [1, 4], "INT64").set_data_from_numpy(np.zeros((1, 4), np.int64)),
                ]
                client.async_stream_infer("tiny", bad, request_id="bad")
                continue
            dense, ids = random_request(rng, 1 + i % 3)
            sent[str(i)] = (dense, ids)
            client.async_stream_infer("tiny", grpc_inputs(dense, ids), request_id=str(i))
        got, errors = {}, []
        for _ in range(8):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = (result.as_numpy("p"), result.as_numpy("y"))
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "'dense'" in errors[0] and "expected shape [-1, 3]" in errors[0], errors
    assert sorted(got) == sorted(sent)
    for key, (dense, ids) in sent.items():
        p, y = http_answer(server, dense, ids)
        assert np.array_equal(got[key][0], p) and np.array_equal(got[key][1], y)
        np.testing.assert_allclose(got[key][1], torch_outputs(models.module_a, dense, ids)[1], atol=1e-6)


def test_load_unload_need_the_token_and_statistics(client: Any, models: Models) -> None:
    for headers, why in ((None, "no control token"), ({"authorization": "Bearer nope"}, "wrong control token")):
        got, message = code_of(lambda h=headers: client.unload_model("spare", headers=h))
        assert got == "PERMISSION_DENIED" and why in message
    assert client.is_model_ready("spare")
    client.unload_model("spare", headers={"authorization": f"Bearer {TOKEN}"})
    assert not client.is_model_ready("spare")
    dense, ids = random_request(np.random.default_rng(6), 1)
    got, message = code_of(lambda: client.infer("spare", grpc_inputs(dense, ids)))
    assert got == "UNAVAILABLE" and "unloaded" in message
    index = {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert index[("spare", "1")] == ("UNAVAILABLE", "unloaded")
    client.load_model("spare", headers={"mtlib-control-token": TOKEN})
    assert client.is_model_ready("spare")
    got, _ = code_of(lambda: client.load_model("not-in-repo", headers={"mtlib-control-token": TOKEN}))
    assert got == "INVALID_ARGUMENT"

    before = client.get_inference_statistics("spare").model_stats[0]
    for rows in (1, 3):
        client.infer("spare", grpc_inputs(*random_request(np.random.default_rng(rows), rows)))
    stats = client.get_inference_statistics("spare").model_stats[0]
    assert (stats.name, stats.version) == ("spare", "1")
    assert stats.inference_stats.success.count == before.inference_stats.success.count + 2
    assert stats.inference_count == before.inference_count + 4
    assert stats.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    every = {(s.name, s.version) for s in client.get_inference_statistics().model_stats}
    assert {("tiny", "1"), ("spare", "1"), ("typed", "1"), ("text", "1")} <= every


def test_32_concurrent_async_requests_equal_single_answers(server: Running) -> None:
    rng = np.random.default_rng(5)
    requests = [random_request(rng, int(rng.integers(1, 4))) for _ in range(32)]
    single = []
    with grpcclient.InferenceServerClient(server.grpc_url) as c:  # type: ignore[attr-defined]
        for dense, ids in requests:
            result = c.infer("tiny", grpc_inputs(dense, ids))
            single.append((result.as_numpy("p"), result.as_numpy("y")))

    async def run() -> list[Any]:
        c = grpcaio.InferenceServerClient(server.grpc_url)  # type: ignore[attr-defined]
        try:
            inputs = []
            for dense, ids in requests:
                a = grpcaio.InferInput("dense", list(dense.shape), "FP32").set_data_from_numpy(dense)
                b = grpcaio.InferInput("ids", list(ids.shape), "INT64").set_data_from_numpy(ids)
                inputs.append([a, b])
            return await asyncio.wait_for(asyncio.gather(*(c.infer("tiny", i) for i in inputs)), 30)
        finally:
            await c.close()

    results = asyncio.run(run())
    for (p, y), result in zip(single, results, strict=True):
        assert bitwise_equal(result.as_numpy("p"), p) and bitwise_equal(result.as_numpy("y"), y)


def test_grpc_port_in_use_and_off(tmp_path: Path, models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.server import ListenError

    write_config(tmp_path, tiny_config("tiny"))
    write_version(tmp_path, "tiny", 1, models.onnx_a)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as err:
            Running(ServerOptions(tmp_path, host="127.0.0.1", port=0, grpc_port=port, shutdown_timeout_s=1))
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in str(err.value)
    assert "--grpc-port" in str(err.value)
    off = Running(ServerOptions(tmp_path, host="127.0.0.1", port=0, shutdown_timeout_s=1))
    try:
        assert off.server.grpc is None and off.server.grpc_port is None
    finally:
        off.stop()
    monkeypatch.setitem(sys.modules, "serving.grpc_server", None)  # grpcio / tritonclient[grpc] not installed
    http_only = Running(ServerOptions(tmp_path, host="127.0.0.1", port=0, grpc_port=free_port(), shutdown_timeout_s=1))
    try:
        assert http_only.server.grpc is None and http_only.server.port
    finally:
        http_only.stop()


def test_cli_flag_and_graceful_stop(tmp_path: Path, models: Models) -> None:
    from serving.cli import parse_args

    assert parse_args(["--model-repository", str(tmp_path)])[0].grpc_port == 8001
    assert parse_args(["--model-repository", str(tmp_path), "--grpc-port", "0"])[0].grpc_port == 0
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--grpc-port", "70000"])

    write_config(tmp_path, tiny_config("tiny"))
    write_version(tmp_path, "tiny", 1, models.onnx_a)
    running = Running(ServerOptions(tmp_path, host="127.0.0.1", port=0, grpc_port=free_port(), shutdown_timeout_s=5))
    url = f"127.0.0.1:{running.server.grpc_port}"
    rng = np.random.default_rng(8)
    requests = [random_request(rng, 2) for _ in range(16)]

    async def run() -> list[Any]:
        c = grpcaio.InferenceServerClient(url)
        try:
            calls = []
            for dense, ids in requests:
                a = grpcaio.InferInput("dense", list(dense.shape), "FP32").set_data_from_numpy(dense)
                b = grpcaio.InferInput("ids", list(ids.shape), "INT64").set_data_from_numpy(ids)
                calls.append(c.infer("tiny", [a, b]))
            pending = asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.01)
            await asyncio.get_running_loop().run_in_executor(None, running.stop)  # stop while requests are in flight
            return await asyncio.wait_for(pending, 30)
        finally:
            await c.close()

    answers = asyncio.run(run())
    for (dense, ids), answer in zip(requests, answers, strict=True):
        if isinstance(answer, InferenceServerException):  # refused at the door: UNAVAILABLE, never a broken answer
            assert str(answer.status()) == "StatusCode.UNAVAILABLE", (answer.message(), answers)
        else:
            np.testing.assert_allclose(answer.as_numpy("y"), torch_outputs(models.module_a, dense, ids)[1], atol=1e-6)
    with grpcclient.InferenceServerClient(url) as c:
        got, _ = code_of(lambda: c.is_server_live(client_timeout=2))
    assert got in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
