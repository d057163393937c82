"""``mtlib-serve`` against a real ``tritonclient.http`` client (and raw HTTP) on loopback.

The server runs in-process (its own event loop in a background thread) over a Triton-layout repository of tiny
ONNX models exported here from torch (an FP32 [B, 3] input, INT64 [B, 4] embedding ids, two [B, 1] outputs),
plus two built with ``onnx.helper`` for the FP16 / INT32 / BOOL and BYTES datatypes. Expected values come from
the torch module (close) and from a separate ONNX Runtime session run on each request alone (bitwise).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("aiohttp")

from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.batching import DynamicBatcher  # noqa: E402
from serving.cli import parse_args  # noqa: E402
from serving.metrics import MetricsRegistry, escape_label_value  # noqa: E402
from serving.options import ServerOptions  # noqa: E402
from serving.protocol import InferenceError, Signature, encode_infer_response, parse_infer_request  # noqa: E402
from serving.repository import ModelConfig, TensorConfig, write_config  # noqa: E402
from serving.server import Server  # noqa: E402
from serving.sessions import check_model_io, choose_providers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_BODY = 1 << 20
POLL_S = 0.1


class Tiny(nn.Module):
    """Dense features and mean-pooled embedding ids into a small MLP with a probability and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.p = nn.Linear(16, 1)
        self.y = nn.Linear(16, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([dense, self.emb(ids).mean(1)], dim=1))
        return torch.sigmoid(self.p(h)), self.y(h)


def export_tiny(seed: int, directory: Path) -> tuple[Tiny, bytes]:
    """Export a seeded :class:`Tiny` with dynamic batch and id-list axes; returns the module and the ONNX bytes."""
    torch.manual_seed(seed)
    module = Tiny().eval()
    args = (torch.randn(2, 3), torch.randint(0, 10, (2, 4)))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=["dense", "ids"],
        output_names=["p", "y"],
        dynamic_shapes=({0: batch}, {0: batch, 1: length}),
    )
    path = directory / f"tiny{seed}.onnx"
    program.save(str(path))
    return module, path.read_bytes()


def typed_model() -> bytes:
    """FP16, INT32 and BOOL in and out: ``a2 = a + a``, ``b2 = b * 3``, ``c2 = not c`` (each [B, 2])."""
    from onnx import TensorProto as T
    from onnx import helper

    three = helper.make_tensor("three", T.INT32, [], [3])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["a2"]), helper.make_node("Mul", ["b", "three"], ["b2"])]
        + [helper.make_node("Not", ["c"], ["c2"])],
        "typed",
        [
            helper.make_tensor_value_info(n, t, ["batch", 2])
            for n, t in (("a", T.FLOAT16), ("b", T.INT32), ("c", T.BOOL))
        ],
        [
            helper.make_tensor_value_info(n, t, ["batch", 2])
            for n, t in (("a2", T.FLOAT16), ("b2", T.INT32), ("c2", T.BOOL))
        ],
        initializer=[three],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def text_model() -> bytes:
    """A BYTES (ONNX string) identity on [B, 1]."""
    from onnx import TensorProto as T
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_out"])],
        "text",
        [helper.make_tensor_value_info("s", T.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("s_out", T.STRING, ["batch", 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def write_version(repo: Path, name: str, version: int, model: bytes) -> None:
    """Write ``REPO/NAME/VERSION/model.onnx`` the way an exporter does: a temporary directory renamed into place,
    so the version directory appears only complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=repo / name))
    (tmp / "model.onnx").write_bytes(model)
    tmp.rename(repo / name / str(version))


def tiny_config(name: str, ids_dims: tuple[int, ...] = (4,), **kw: Any) -> ModelConfig:
    return ModelConfig(
        name,
        inputs=[TensorConfig("dense", "FP32", (3,)), TensorConfig("ids", "INT64", ids_dims)],
        outputs=[TensorConfig("p", "FP32", (1,)), TensorConfig("y", "FP32", (1,))],
        max_batch_size=64,
        max_queue_delay_microseconds=200,
        instance_kind="KIND_CPU",
        **kw,
    )


def local_session(model: bytes) -> Any:
    """The reference: a session with the server's thread settings, run on each request alone."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


class Running:
    """A :class:`Server` on its own event loop in a daemon thread."""

    def __init__(self, options: ServerOptions) -> None:
        self.server = Server(options)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as err:  # surfaced by the fixture
                self.error = err
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="mtlib-serve-test", daemon=True)
        self.thread.start()
        started.wait(60)
        if self.error is not None:
            raise self.error
        self.url = f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@dataclass(frozen=True)
class Models:
    """Two seeded :class:`Tiny` modules and their ONNX exports."""

    module_a: Tiny
    module_b: Tiny
    onnx_a: bytes = field(repr=False)
    onnx_b: bytes = field(repr=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("onnx")
    module_a, onnx_a = export_tiny(0, work)
    module_b, onnx_b = export_tiny(1, work)
    return Models(module_a, module_b, onnx_a, onnx_b)


def typed_and_text_configs() -> tuple[ModelConfig, ModelConfig]:
    """The configs of ``typed_model()`` (FP16, INT32 and BOOL in and out) and ``text_model()`` (BYTES)."""
    typed = ModelConfig(
        "typed",
        inputs=[TensorConfig("a", "FP16", (2,)), TensorConfig("b", "INT32", (2,)), TensorConfig("c", "BOOL", (2,))],
        outputs=[TensorConfig("a2", "FP16", (2,)), TensorConfig("b2", "INT32", (2,)), TensorConfig("c2", "BOOL", (2,))],
        max_batch_size=8,
    )
    text = ModelConfig(
        "text", [TensorConfig("s", "BYTES", (1,))], [TensorConfig("s_out", "BYTES", (1,))], max_batch_size=8
    )
    return typed, text


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Path:
    root = tmp_path_factory.mktemp("repo")
    a, b = models.onnx_a, models.onnx_b
    for cfg, versions in (
        (tiny_config("tiny"), {1: a}),
        (tiny_config("var", ids_dims=(-1,)), {1: a}),
        (tiny_config("multi", version_policy="all"), {1: a, 2: b}),
        (tiny_config("swap"), {1: a}),
        (tiny_config("spare"), {1: a}),
    ):
        write_config(root, cfg)
        for v, model in versions.items():
            write_version(root, cfg.name, v, model)
    typed, text = typed_and_text_configs()
    nobatch = ModelConfig(  # max_batch_size 0: dims are the whole shape, requests never concatenate
        "nobatch",
        inputs=[TensorConfig(n, t, (-1, 2)) for n, t in (("a", "FP16"), ("b", "INT32"), ("c", "BOOL"))],
        outputs=[TensorConfig(n, t, (-1, 2)) for n, t in (("a2", "FP16"), ("b2", "INT32"), ("c2", "BOOL"))],
        max_batch_size=0,
    )
    for cfg, model in ((typed, typed_model()), (text, text_model()), (nobatch, typed_model())):
        write_config(root, cfg)
        write_version(root, cfg.name, 1, model)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Running]:
    running = Running(
        ServerOptions(
            repo,
            host="127.0.0.1",
            port=0,
            max_body_size=MAX_BODY,
            poll_interval_s=POLL_S,
            shutdown_timeout_s=10,
            model_control_mode="explicit",  # these tests load, unload and swap versions
        )
    )
    yield running
    running.stop()
    assert not running.thread.is_alive()
    with pytest.raises(OSError):  # the port no longer accepts connections
        socket.create_connection(("127.0.0.1", running.server.port), timeout=1).close()


@pytest.fixture
def client(server: Running) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(server.url)
    yield c
    c.close()


# ------------------------------------------------------------------------------------------------------ helpers


def tiny_inputs(dense: np.ndarray, ids: np.ndarray, binary: bool = True) -> list[Any]:
    a = httpclient.InferInput("dense", list(dense.shape), "FP32")
    a.set_data_from_numpy(dense, binary_data=binary)
    b = httpclient.InferInput("ids", list(ids.shape), "INT64")
    b.set_data_from_numpy(ids, binary_data=binary)
    return [a, b]


def random_request(rng: np.random.Generator, rows: int, length: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((rows, 3)).astype(np.float32), rng.integers(0, 10, (rows, length)).astype(np.int64)


def torch_outputs(module: nn.Module, dense: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        p, y = module(torch.from_numpy(dense), torch.from_numpy(ids))
    return p.numpy(), y.numpy()


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raw_http(
    server: Running, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw HTTP request; 4xx and 5xx are returned, not raised."""
    req = urllib.request.Request(f"http://{server.url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def metrics(server: Running) -> dict[tuple[str, str, str], float]:
    """``{(metric, model, version): value}`` parsed from ``/metrics``."""
    status, _, body = raw_http(server, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        m = re.fullmatch(r'(\w+)\{model="([^"]*)",version="([^"]*)"\} (\S+)', line)
        if m:
            out[(m.group(1), m.group(2), m.group(3))] = float(m.group(4))
    return out


def good_tiny_request(client: Any, module: nn.Module) -> None:
    dense, ids = random_request(np.random.default_rng(7), 2)
    result = client.infer("tiny", tiny_inputs(dense, ids))
    p, y = torch_outputs(module, dense, ids)
    np.testing.assert_allclose(result.as_numpy("p"), p, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("y"), y, atol=1e-6)


def index_entry(client: Any, name: str, version: str) -> dict[str, Any] | None:
    return next(
        (e for e in client.get_model_repository_index() if e["name"] == name and e.get("version") == version), None
    )


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------- endpoints


def test_health_and_metadata(client: Any, server: Running) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "mtlib" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("tiny")
    assert model["name"] == "tiny" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "dense", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
    ]
    assert model["outputs"] == [
        {"name": "p", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "y", "datatype": "FP32", "shape": [-1, 1]},
    ]
    assert client.get_model_metadata("var")["inputs"][1]["shape"] == [-1, -1]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2") and not client.is_model_ready("nope")
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 64 and config["input"][1] == {
        "name": "ids",
        "data_type": "TYPE_INT64",
        "dims": [4],
    }
    status, _, body = raw_http(server, "GET", "/v2/models/nope")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    status, _, body = raw_http(server, "GET", "/v2/no/such/endpoint")
    assert status == 404 and "error" in json.loads(body)


def test_infer_binary_and_json_match_torch(client: Any, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(0), 5)
    p, y = torch_outputs(models.module_a, dense, ids)
    binary = client.infer("tiny", tiny_inputs(dense, ids), request_id="req-42")
    assert binary.get_response()["id"] == "req-42" and binary.get_response()["model_version"] == "1"
    assert binary.get_output("p")["parameters"]["binary_data_size"] == 5 * 4
    np.testing.assert_allclose(binary.as_numpy("p"), p, atol=1e-6)
    np.testing.assert_allclose(binary.as_numpy("y"), y, atol=1e-6)

    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("p", "y")]
    as_json = client.infer("tiny", tiny_inputs(dense, ids, binary=False), outputs=outputs)
    assert "data" in as_json.get_output("p") and "parameters" not in as_json.get_output("p")
    for name in ("p", "y"):  # JSON numbers carry float32 exactly: same bits as the binary response
        assert bitwise_equal(as_json.as_numpy(name).astype(np.float32), binary.as_numpy(name))

    for algorithm in ("gzip", "deflate"):  # compressed request bodies (Content-Encoding)
        packed = client.infer("tiny", tiny_inputs(dense, ids), request_compression_algorithm=algorithm)
        assert bitwise_equal(packed.as_numpy("y"), binary.as_numpy("y"))


def test_requested_outputs_subset(client: Any, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(1), 3)
    p, y = torch_outputs(models.module_a, dense, ids)
    only_y = client.infer("tiny", tiny_inputs(dense, ids), outputs=[httpclient.InferRequestedOutput("y")])
    assert [o["name"] for o in only_y.get_response()["outputs"]] == ["y"]
    assert only_y.as_numpy("p") is None
    np.testing.assert_allclose(only_y.as_numpy("y"), y, atol=1e-6)
    mixed = client.infer(
        "tiny",
        tiny_inputs(dense, ids),
        outputs=[httpclient.InferRequestedOutput("y", binary_data=False), httpclient.InferRequestedOutput("p")],
    )
    assert [o["name"] for o in mixed.get_response()["outputs"]] == ["y", "p"]
    np.testing.assert_allclose(mixed.as_numpy("p"), p, atol=1e-6)
    np.testing.assert_allclose(mixed.as_numpy("y"), y, atol=1e-6)


def test_plain_json_client_with_nested_data(server: Running, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(2), 2)
    request = {
        "id": "plain",
        "inputs": [
            {"name": "ids", "shape": [2, 4], "datatype": "INT64", "data": ids.tolist()},  # nested, any input order
            {"name": "dense", "shape": [2, 3], "datatype": "FP32", "data": dense.ravel().tolist()},
        ],
    }
    status, headers, body = raw_http(
        server, "POST", "/v2/models/tiny/infer", json.dumps(request).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert "Inference-Header-Content-Length" not in headers
    response = json.loads(body)
    assert response["id"] == "plain" and response["model_name"] == "tiny"
    p, y = torch_outputs(models.module_a, dense, ids)
    got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in response["outputs"]}
    np.testing.assert_allclose(got["p"], p, atol=1e-6)
    np.testing.assert_allclose(got["y"], y, atol=1e-6)


def test_fp16_int32_bool_and_bytes(client: Any) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 2)).astype(np.float16)
    b = rng.integers(-1000, 1000, (3, 2)).astype(np.int32)
    c = rng.random((3, 2)) > 0.5
    for binary in (True, False):
        inputs = []
        for name, arr, dt in (("a", a, "FP16"), ("b", b, "INT32"), ("c", c, "BOOL")):
            inputs.append(httpclient.InferInput(name, list(arr.shape), dt).set_data_from_numpy(arr, binary_data=binary))
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("a2", "b2", "c2")]
        result = client.infer("typed", inputs, outputs=outputs)
        assert bitwise_equal(result.as_numpy("a2"), a + a)
        assert bitwise_equal(result.as_numpy("b2"), b * 3)
        assert bitwise_equal(result.as_numpy("c2"), ~c)

    meta = client.get_model_metadata("nobatch")
    assert meta["inputs"][0] == {"name": "a", "datatype": "FP16", "shape": [-1, 2]}
    inputs = [
        httpclient.InferInput(n, [3, 2], dt).set_data_from_numpy(arr)
        for n, arr, dt in (("a", a, "FP16"), ("b", b, "INT32"), ("c", c, "BOOL"))
    ]
    assert bitwise_equal(client.infer("nobatch", inputs).as_numpy("b2"), b * 3)

    words = np.array([["héllo"], [""], ["naïve café"]], dtype=np.object_)
    as_bytes = np.array([[w.encode()] for w in words.ravel()], dtype=np.object_)
    text = httpclient.InferInput("s", [3, 1], "BYTES").set_data_from_numpy(as_bytes)
    out = client.infer("text", [text]).as_numpy("s_out")
    assert [v.decode() for v in out.ravel()] == list(words.ravel())
    text = httpclient.InferInput("s", [3, 1], "BYTES").set_data_from_numpy(words, binary_data=False)
    out = client.infer("text", [text], outputs=[httpclient.InferRequestedOutput("s_out", binary_data=False)])
    assert list(out.as_numpy("s_out").ravel()) == list(words.ravel())


# ------------------------------------------------------------------------------------------------------ errors


def _binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def _json_body(inputs: list[dict[str, Any]], **extra: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": inputs, **extra}).encode(), {"Content-Type": "application/json"}


DENSE = {"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}
IDS = {"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}
DENSE_BIN = {"name": "dense", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}
IDS_BIN = {"name": "ids", "shape": [1, 4], "datatype": "INT64", "parameters": {"binary_data_size": 32}}
F3 = np.ones(3, np.float32).tobytes()
I4 = np.arange(4, dtype=np.int64).tobytes()

INFER = "/v2/models/tiny/infer"


def case(name: str, request: tuple[bytes, dict[str, str]], status: int, *fragments: str, path: str = INFER) -> Any:
    """One malformed request: what the error status and message (all ``fragments``) must be."""
    return pytest.param(path, request, status, fragments, id=name)


MALFORMED = [
    case("unknown model", _json_body([DENSE, IDS]), 404, "unknown model 'nope'", path="/v2/models/nope/infer"),
    case(
        "unknown version",
        _json_body([DENSE, IDS]),
        404,
        "no ready version '9'",
        path="/v2/models/tiny/versions/9/infer",
    ),
    case("wrong input name", _json_body([{**DENSE, "name": "dens"}, IDS]), 400, "'dens'", "'dense'"),
    case("missing input", _json_body([DENSE]), 400, "missing input", "'ids'", "INT64", "[-1, 4]"),
    case("wrong shape", _json_body([{**DENSE, "shape": [1, 4]}, IDS]), 400, "'dense'", "[-1, 3]", "[1, 4]"),
    case("wrong datatype", _json_body([{**DENSE, "datatype": "FP64"}, IDS]), 400, "'dense'", "FP32", "FP64"),
    case("element count", _json_body([{**DENSE, "data": [1.0, 2.0]}, IDS]), 400, "3 elements", "has 2"),
    case("floats for ints", _json_body([DENSE, {**IDS, "data": [1.5, 2, 3, 4]}]), 400, "'ids'", "INT64"),
    case("ragged data", _json_body([{**DENSE, "data": [[1.0, 2.0], [3.0]]}, IDS]), 400, "'dense'", "rectangular"),
    case("batch too big", _json_body([{**DENSE, "shape": [65, 3]}, IDS]), 400, "max_batch_size 64", "65"),
    case("batch sizes differ", _json_body([DENSE, {**IDS, "shape": [2, 4], "data": [1] * 8}]), 400, "batch size"),
    case("unknown output", _json_body([DENSE, IDS], outputs=[{"name": "z"}]), 400, "'z'", "'p'", "'y'"),
    case("id out of range", _json_body([DENSE, {**IDS, "data": [1, 2, 3, 99]}]), 400, "rejected", "Gather"),
    case("malformed JSON", (b'{"inputs": [', {}), 400, "malformed JSON"),
    case("not an object", (b"[1, 2]", {}), 400, "JSON object"),
    case(
        "binary size wrong",
        _binary_body({"inputs": [{**DENSE_BIN, "parameters": {"binary_data_size": 8}}, IDS_BIN]}, F3[:8], I4),
        400,
        "'dense'",
        "needs 12 bytes",
        "binary_data_size is 8",
    ),
    case("binary past end", _binary_body({"inputs": [DENSE_BIN, IDS_BIN]}, F3, I4[:16]), 400, "'ids'", "past the end"),
    case(
        "extra binary bytes", _binary_body({"inputs": [DENSE_BIN, IDS_BIN]}, F3, I4, b"xx"), 400, "46", "add up to 44"
    ),
    case("header length junk", (b"{}", {"Inference-Header-Content-Length": "abc"}), 400, "integer", "'abc'"),
    case("header length too big", (b"{}", {"Inference-Header-Content-Length": "99"}), 400, "is 99", "has 2 bytes"),
]


@pytest.mark.parametrize(("path", "request_", "status", "fragments"), MALFORMED)
def test_malformed_requests_get_json_errors(
    path: str,
    request_: tuple[bytes, dict[str, str]],
    status: int,
    fragments: tuple[str, ...],
    server: Running,
    client: Any,
    models: Models,
) -> None:
    body, headers = request_
    got_status, got_headers, got_body = raw_http(server, "POST", path, body, headers)
    assert got_status == status, got_body
    assert got_headers["Content-Type"].startswith("application/json")
    message = json.loads(got_body)["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    good_tiny_request(client, models.module_a)  # and the server keeps serving


def test_failures_are_counted(server: Running, client: Any) -> None:
    before = metrics(server).get(("nv_inference_request_failure", "tiny", "1"), 0)
    body, headers = _json_body([{**DENSE, "datatype": "INT32"}, IDS])
    assert raw_http(server, "POST", "/v2/models/tiny/infer", body, headers)[0] == 400
    assert metrics(server)[("nv_inference_request_failure", "tiny", "1")] == before + 1


def test_body_over_the_limit_is_413(server: Running, client: Any, models: Models) -> None:
    big = b" " * (MAX_BODY + 10)
    status, _, body = raw_http(server, "POST", "/v2/models/tiny/infer", big, {"Content-Type": "application/json"})
    assert status == 413 and str(MAX_BODY) in json.loads(body)["error"]
    conn = http.client.HTTPConnection(server.url, timeout=30)  # chunked: no Content-Length to check up front
    conn.request(
        "POST", "/v2/models/tiny/infer", body=iter([big[: MAX_BODY // 2], big[MAX_BODY // 2 :]]), encode_chunked=True
    )
    response = conn.getresponse()
    assert response.status == 413 and str(MAX_BODY) in json.loads(response.read())["error"]
    conn.close()
    good_tiny_request(client, models.module_a)


# ---------------------------------------------------------------------------------------------- HTTP details


def exchange(
    server: Running, data: bytes, responses: int = 1, head: bool = False
) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Send raw bytes on one connection; read ``responses`` HTTP responses: (status line, headers, body).
    ``head``: answers to HEAD, whose Content-Length describes a body that is not sent."""
    sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=30)
    sock.sendall(data)
    stream = sock.makefile("rb")
    out = []
    for _ in range(responses):
        status = stream.readline().rstrip(b"\r\n")
        headers = {}
        while line := stream.readline().rstrip(b"\r\n"):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        out.append((status, headers, b"" if head else stream.read(int(headers.get("content-length", "0")))))
    sock.close()
    return out


def test_http_pipelining_head_405_http10_and_bad_requests(server: Running) -> None:
    body, _ = _json_body([DENSE, IDS])
    infer = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    ready = b"GET /v2/models/ti%6Ey/ready HTTP/1.1\r\nHost: t\r\n\r\n"  # percent-encoded path
    first, second, third = exchange(server, infer + ready + infer, responses=3)  # pipelined: answered in order
    assert first[0] == b"HTTP/1.1 200 OK" and second[0] == b"HTTP/1.1 200 OK" and third[2] == first[2]
    assert json.loads(first[2])["model_name"] == "tiny" and second[2] == b""

    head_then_get = b"HEAD /v2 HTTP/1.1\r\nHost: t\r\n\r\nGET /v2/health/live HTTP/1.1\r\n\r\n"
    (status, headers, _), (after, _, _) = exchange(server, head_then_get, responses=2, head=True)
    assert status == b"HTTP/1.1 200 OK" and int(headers["content-length"]) > 0
    assert after == b"HTTP/1.1 200 OK"  # no body bytes followed the HEAD answer
    [(status, headers, payload)] = exchange(server, f"GET {INFER} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert status.startswith(b"HTTP/1.1 405") and headers["allow"] == "POST" and "POST" in json.loads(payload)["error"]
    [(status, headers, _)] = exchange(server, b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK" and headers["connection"] == "close"
    for bad, code in (
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"POST /v2 HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"400"),
        (b"POST /v2 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"400"),
    ):
        [(status, headers, payload)] = exchange(server, bad)
        assert status.split(b" ")[1] == code and headers["connection"] == "close" and json.loads(payload)["error"]


def test_http_expect_100_continue(server: Running, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(9), 1)
    body, _ = _json_body([{**DENSE, "data": dense.ravel().tolist()}, {**IDS, "data": ids.ravel().tolist()}])
    sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=30)
    sock.sendall(
        f"POST {INFER} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # only then does the client send the body
    sock.sendall(body)
    stream = sock.makefile("rb")
    assert stream.readline().startswith(b"HTTP/1.1 200")
    sock.close()


@pytest.mark.parametrize("front_end", ["aiohttp", "uvicorn"])
def test_library_front_ends(repo: Path, models: Models, front_end: str) -> None:
    """The same service behind aiohttp and behind uvicorn (serving.http_asgi): inference in binary and JSON,
    a 400 naming the expected shape, a 413 for a body over the limit."""
    pytest.importorskip(front_end)
    running = Running(
        ServerOptions(
            repo,
            host="127.0.0.1",
            port=0,
            max_body_size=MAX_BODY,
            poll_interval_s=0,
            http_server=front_end,
            shutdown_timeout_s=1,
        )
    )
    try:
        c = httpclient.InferenceServerClient(running.url)
        good_tiny_request(c, models.module_a)
        as_json = c.infer("tiny", tiny_inputs(*random_request(np.random.default_rng(10), 2), binary=False))
        assert as_json.get_response()["model_name"] == "tiny"
        c.close()
        body, headers = _json_body([{**DENSE, "shape": [1, 4]}, IDS])
        status, _, payload = raw_http(running, "POST", INFER, body, headers)
        assert status == 400 and "[-1, 3]" in json.loads(payload)["error"]
        conn = http.client.HTTPConnection(running.url, timeout=30)
        conn.request("POST", INFER, body=b" " * (MAX_BODY + 1), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and str(MAX_BODY) in json.loads(response.read())["error"]
        conn.close()
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_bitwise_equal_to_unbatched(server: Running, models: Models) -> None:
    reference = local_session(models.onnx_a)
    before = metrics(server)
    results: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        c = httpclient.InferenceServerClient(server.url)
        try:
            for i in range(25):
                model = "var" if i % 3 == 2 else "tiny"  # var: id lists of differing lengths in one stream
                dense, ids = random_request(
                    rng, int(rng.integers(1, 4)), 4 if model == "tiny" else int(rng.integers(2, 6))
                )
                r = c.infer(model, tiny_inputs(dense, ids))
                results.append((model, dense, ids, {n: r.as_numpy(n) for n in ("p", "y")}))
        except BaseException as err:
            errors.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == 12 * 25
    for _, dense, ids, got in results:
        alone = reference.run(["p", "y"], {"dense": dense, "ids": ids})
        assert bitwise_equal(got["p"], alone[0]) and bitwise_equal(got["y"], alone[1])

    after = metrics(server)

    def delta(name: str) -> float:
        return after[(name, "tiny", "1")] - before.get((name, "tiny", "1"), 0)

    requests = sum(m == "tiny" for m, *_ in results)
    rows = sum(len(d) for m, d, _, _ in results if m == "tiny")
    assert delta("nv_inference_request_success") == requests and delta("nv_inference_count") == rows
    # batched: fewer executions than requests (rows per execution exceed rows per request)
    assert delta("nv_inference_exec_count") < requests, f"no batching: {requests} requests in as many executions"
    assert delta("nv_inference_count") / delta("nv_inference_exec_count") > rows / requests


async def _collect(batcher: DynamicBatcher, requests: list[tuple[dict[str, np.ndarray], Any]]) -> list[Any]:
    calls = [batcher.infer(inputs, len(next(iter(inputs.values()))), ["out"], key) for inputs, key in requests]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_batcher_concatenates_separates_keys_and_isolates_failures() -> None:
    calls: list[int] = []

    def runner(feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        x = feed["x"]
        calls.append(x.shape[0])
        if (x < 0).any():
            raise ValueError("negative input")
        return [x.sum(axis=1, keepdims=True) * 2]

    def make(inline: float) -> DynamicBatcher:
        return DynamicBatcher([runner], max_batch_size=8, inline_max_us=inline, name="unit")

    x = [np.full((n, k), float(i + 1), np.float32) for i, (n, k) in enumerate([(1, 2), (2, 2), (3, 3), (1, 2)])]
    for inline in (0.0, 1e9):  # worker thread, and inline on the loop (estimate seeded below)
        calls.clear()
        batcher = make(inline)
        batcher.observe(1000, 1)
        out = asyncio.run(_collect(batcher, [({"x": a}, a.shape[1:]) for a in x]))
        assert sorted(calls) == [3, 4]  # the [*, 2] requests together, the [*, 3] one alone
        for a, (arrays, timing) in zip(x, out):
            assert bitwise_equal(arrays[0], a.sum(axis=1, keepdims=True) * 2) and timing[3] in (3, 4)
        batcher.close()

    calls.clear()
    batcher = make(0.0)
    bad = np.array([[-1.0, 0.0]], np.float32)
    out = asyncio.run(_collect(batcher, [({"x": x[0]}, ()), ({"x": bad}, ()), ({"x": x[1]}, ())]))
    assert calls == [4, 1, 1, 2]  # the batch failed, then each request ran alone
    assert isinstance(out[1], ValueError) and bitwise_equal(out[2][0][0], x[1].sum(axis=1, keepdims=True) * 2)
    batcher.close()

    calls.clear()
    batcher = make(0.0)
    over = [np.ones((5, 2), np.float32), np.ones((5, 2), np.float32)]  # 10 rows > max_batch_size 8: two runs
    asyncio.run(_collect(batcher, [({"x": a}, ()) for a in over]))
    assert calls == [5, 5]
    batcher.close()


def test_batcher_waits_max_queue_delay_only_while_another_instance_runs() -> None:
    release = threading.Event()
    sizes: list[int] = []

    def slow(feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        sizes.append(feed["x"].shape[0])
        if len(sizes) == 1:
            release.wait(5)
        return [feed["x"]]

    async def scenario() -> list[int]:
        batcher = DynamicBatcher([slow, slow], max_batch_size=8, max_queue_delay_us=600_000, name="delay")
        one = np.ones((1, 1), np.float32)
        first = asyncio.ensure_future(batcher.infer({"x": one}, 1, ["y"]))
        await asyncio.sleep(0.05)  # the idle model ran it at once (a worker is now blocked in it)
        assert sizes == [1]
        start = time.perf_counter()
        rest = [asyncio.ensure_future(batcher.infer({"x": one}, 1, ["y"])) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert sizes == [1]  # the free instance waits for more (one instance is busy), up to 600 ms
        await asyncio.gather(*rest)
        waited = time.perf_counter() - start
        release.set()
        await first
        batcher.close()
        assert 0.55 < waited < 3.0
        return sizes

    assert asyncio.run(scenario()) == [1, 3]


# ------------------------------------------------------------------------------------- versions and repository


def test_multiple_versions(client: Any, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(4), 2)
    meta = client.get_model_metadata("multi")
    assert meta["versions"] == ["1", "2"] and client.get_model_metadata("multi", "1")["versions"] == ["1"]
    for version, module in (("1", models.module_a), ("2", models.module_b)):
        r = client.infer("multi", tiny_inputs(dense, ids), model_version=version)
        assert r.get_response()["model_version"] == version
        np.testing.assert_allclose(r.as_numpy("y"), torch_outputs(module, dense, ids)[1], atol=1e-6)
    assert client.infer("multi", tiny_inputs(dense, ids)).get_response()["model_version"] == "2"  # latest
    with pytest.raises(InferenceServerException) as err:
        client.infer("multi", tiny_inputs(dense, ids), model_version="7")
    assert err.value.status() == "404"


def test_new_version_goes_live_under_load_without_losing_requests(
    server: Running, client: Any, repo: Path, models: Models
) -> None:
    sessions = {"1": local_session(models.onnx_a), "2": local_session(models.onnx_b)}
    stop = threading.Event()
    seen: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        c = httpclient.InferenceServerClient(server.url)
        try:
            while not stop.is_set():
                dense, ids = random_request(rng, 2)
                r = c.infer("swap", tiny_inputs(dense, ids))
                seen.append((r.get_response()["model_version"], dense, ids, r.as_numpy("y")))
        except BaseException as err:
            errors.append(err)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 20, what="traffic on version 1")
        write_version(repo, "swap", 2, models.onnx_b)
        wait_for(lambda: any(v == "2" for v, *_ in seen[-8:]), what="version 2 to serve")
        marker = len(seen)
        wait_for(lambda: len(seen) > marker + 20, what="traffic on version 2")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    versions = [v for v, *_ in seen]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    for version, dense, ids, y in seen:  # each answer is exactly what its version computes
        assert bitwise_equal(y, sessions[version].run(["y"], {"dense": dense, "ids": ids})[0])
    assert index_entry(client, "swap", "2")["state"] == "READY"
    assert index_entry(client, "swap", "1")["state"] == "UNAVAILABLE"
    assert client.get_model_metadata("swap")["versions"] == ["2"]

    # a broken version 3 (not ONNX) is reported and version 2 keeps serving
    write_version(repo, "swap", 3, b"this is not an ONNX model")
    wait_for(lambda: "failed to load" in (index_entry(client, "swap", "3") or {}).get("reason", ""), what="v3 error")
    dense, ids = random_request(np.random.default_rng(5), 1)
    assert client.infer("swap", tiny_inputs(dense, ids)).get_response()["model_version"] == "2"
    assert client.is_server_ready()

    # rewritten correctly, version 3 is retried and serves
    shutil.rmtree(repo / "swap" / "3")
    write_version(repo, "swap", 3, models.onnx_a)
    wait_for(lambda: client.get_model_metadata("swap")["versions"] == ["3"], what="version 3 to serve")
    r = client.infer("swap", tiny_inputs(dense, ids))
    assert r.get_response()["model_version"] == "3"
    assert bitwise_equal(r.as_numpy("y"), sessions["1"].run(["y"], {"dense": dense, "ids": ids})[0])


def test_unload_and_load(client: Any, models: Models) -> None:
    dense, ids = random_request(np.random.default_rng(6), 1)
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    assert client.is_server_ready()  # an unloaded model does not make the server unready
    with pytest.raises(InferenceServerException) as err:
        client.infer("spare", tiny_inputs(dense, ids))
    assert err.value.status() == "404" and "unloaded" in err.value.message()
    time.sleep(3 * POLL_S)  # polling does not bring it back
    assert index_entry(client, "spare", "1") == {
        "name": "spare",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    client.load_model("spare")
    assert client.is_model_ready("spare")
    y = client.infer("spare", tiny_inputs(dense, ids)).as_numpy("y")
    np.testing.assert_allclose(y, torch_outputs(models.module_a, dense, ids)[1], atol=1e-6)
    with pytest.raises(InferenceServerException) as err:
        client.load_model("not-in-repo")
    assert err.value.status() == "400"


def test_metrics_exposition(server: Running, client: Any, models: Models) -> None:
    good_tiny_request(client, models.module_a)
    status, headers, body = raw_http(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    required = [
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_duration_us",
    ]
    for name in required:
        assert f"# TYPE {name} counter" in text and f"# HELP {name} " in text
    values = metrics(server)
    tiny = {name: values[(name, "tiny", "1")] for name in required}
    assert tiny["nv_inference_request_success"] >= 1 and tiny["nv_inference_count"] >= 2
    assert tiny["nv_inference_request_duration_us"] >= tiny["nv_inference_compute_infer_duration_us"] > 0
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    registry = MetricsRegistry()
    registry.stats('odd"name', "1").success = 3
    assert 'nv_inference_request_success{model="odd\\"name",version="1"} 3\n' in registry.render()


# ------------------------------------------------------------------------------------------- units and CLI


def test_protocol_round_trip_and_errors() -> None:
    cfg = tiny_config("unit")
    sig = Signature(cfg)
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {"inputs": [{**DENSE_BIN, "shape": [2, 3], "parameters": {"binary_data_size": 24}}, IDS], "id": 5}
    header["inputs"][1] = {**IDS, "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    head = json.dumps(header).encode()
    req = parse_infer_request(head + dense.tobytes(), str(len(head)), sig)
    assert req.id == 5 and req.rows == 2 and req.outputs == ["p", "y"] and req.binary == [False, False]
    assert bitwise_equal(req.inputs["dense"], dense) and req.inputs["ids"].dtype == np.int64
    body, length = encode_infer_response(
        "unit", "1", "x", ["y", "p"], [dense[:, :1], dense[:, 1:2]], ["FP32"] * 2, [True, False]
    )
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 8 and meta["outputs"][1]["data"] == [1.0, 4.0]
    assert bitwise_equal(np.frombuffer(body[length:], np.float32), dense[:, 0].copy())
    with pytest.raises(InferenceError) as err:
        parse_infer_request(
            json.dumps({"inputs": [DENSE, {**IDS, "data": [1, 2, 3, 2**40]}]}).encode(),
            None,
            Signature(
                ModelConfig(
                    "i32",
                    [TensorConfig("dense", "FP32", (3,)), TensorConfig("ids", "INT32", (4,))],
                    [],
                    max_batch_size=4,
                )
            ),
        )
    assert "INT32" in str(err.value)  # 2**40 does not fit: no silent wrap-around


def test_load_checks_model_against_config(models: Models) -> None:
    session = local_session(models.onnx_a)
    check_model_io(session, tiny_config("ok"), "ok")

    def cfg(inputs: list[TensorConfig], outputs: list[TensorConfig] | None = None) -> ModelConfig:
        return ModelConfig("c", inputs, outputs or [], max_batch_size=8)

    dense, ids = TensorConfig("dense", "FP32", (3,)), TensorConfig("ids", "INT64", (4,))
    wrong = [
        (cfg([TensorConfig("dense", "FP64", (3,)), ids]), "tensor(float) in model.onnx (FP32) but FP64"),
        (cfg([dense]), "needs inputs ['ids'] that config.pbtxt does not declare"),
        (cfg([TensorConfig("dense", "FP32", (3, 1)), ids]), "rank 2"),
        (cfg([TensorConfig("dense", "FP32", (4,)), ids]), "axis 1 is 3 in model.onnx but 4"),
        (cfg([dense, ids], [TensorConfig("q", "FP32", (1,))]), "declares output 'q'"),
        (ModelConfig("c", [dense, ids], [], max_batch_size=0), "rank 2"),  # no batch axis declared
    ]
    for config, fragment in wrong:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            check_model_io(session, config, "m")


def test_choose_providers() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(tiny_config("m"), gpu) == ["CPUExecutionProvider"]  # KIND_CPU
    auto = ModelConfig("m", [], [], instance_kind="KIND_AUTO")
    assert choose_providers(auto, gpu) == gpu and choose_providers(auto, cpu_only) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="KIND_GPU"):
        choose_providers(ModelConfig("m", [], [], instance_kind="KIND_GPU"), cpu_only)
    override = ModelConfig(
        "m", [], [], instance_kind="KIND_GPU", parameters={"execution_providers": "CUDAExecutionProvider"}
    )
    assert choose_providers(override, gpu) == ["CUDAExecutionProvider"]
    with pytest.raises(ValueError, match="CUDAExecutionProvider"):
        choose_providers(override, cpu_only)


def test_cli_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options, level = parse_args(["--model-repository", str(tmp_path), "--port", "9000", "--repository-poll-secs", "0"])
    assert options.port == 9000 and options.poll_interval_s == 0 and level == "INFO"
    assert options.model_control_mode == "none" and options.control_token is None and not options.polls
    monkeypatch.setenv("MTLIB_CONTROL_TOKEN", "from-env")
    options, _ = parse_args(["--model-repository", str(tmp_path), "--model-control-mode", "explicit"])
    assert options.model_control_mode == "explicit" and options.control_token == "from-env"
    argv = ["--model-repository", str(tmp_path), "--model-control-mode", "poll", "--control-token", "t"]
    options, _ = parse_args(argv)
    assert options.polls and options.control_token == "t"
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--model-control-mode", "everything"])
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--max-body-size", "0"])


def _repository_mistakes(tmp: Path) -> dict[str, tuple[Path, str]]:
    """``{case: (path, what the error line says)}`` for paths that are not model repositories."""
    (tmp / "file.txt").write_text("not a directory")
    write_config(tmp / "repo", tiny_config("m"))
    version = tmp / "repo" / "m" / "1"
    version.mkdir()
    (version / "model.onnx").write_bytes(b"")
    parent = f"give its parent: {tmp / 'repo'}"
    return {
        "missing": (tmp / "missing", f"--model-repository {tmp / 'missing'} does not exist"),
        "file": (tmp / "file.txt", f"--model-repository {tmp / 'file.txt'} is a file, not a directory"),
        "model directory": (version.parent, f"is a model directory, not a repository; {parent}"),
        "version directory": (version, f"(it holds model.onnx); give the repository, two levels up: {tmp / 'repo'}"),
    }


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing", [], "does not exist; a model repository holds one directory per model"),
        ("file", [], "is a file"),
        ("model directory", [], "is a model directory"),
        ("version directory", [], "is a version directory"),
        ("ok", ["--port", "70000"], "argument --port: must be an integer from 0 to 65535 (0 picks a free one), got"),
        ("ok", ["--port", "http"], "argument --port: must be an integer from 0 to 65535"),
        ("ok", ["--max-body-size", "0"], "argument --max-body-size: must be an integer >= 1, got '0'"),
        ("ok", ["--keepalive-timeout", "nan"], "argument --keepalive-timeout: must be a number >= 0.001"),
        ("ok", ["--http-server", "nginx"], "argument --http-server: invalid choice: 'nginx'"),
        ("ok", ["--prot", "8000"], "unrecognized arguments: --prot 8000"),
        (None, [], "the following arguments are required: --model-repository"),
    ],
)
def test_cli_user_mistakes_exit_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str | None,
    extra: list[str],
    message: str,
) -> None:
    from serving.cli import main

    monkeypatch.delenv("MTLIB_DEBUG", raising=False)
    mistakes = _repository_mistakes(tmp_path)
    path = tmp_path if case == "ok" else mistakes[case][0] if case is not None else None
    argv = ([] if path is None else ["--model-repository", str(path)]) + extra
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("mtlib-serve: error: "), err
    assert message in lines[0] and "Traceback" not in err
    if case in mistakes:
        assert mistakes[case][1] in lines[0]


def test_cli_repository_check_accepts_repositories(repo: Path, tmp_path: Path) -> None:
    from serving.repository import check_repository

    check_repository(repo)
    check_repository(tmp_path)  # empty: models may be written into it while the server polls


def _serve_cli(args: list[str], debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MTLIB_DEBUG"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if debug:
        env["MTLIB_DEBUG"] = "1"
    cmd = [sys.executable, "-m", "serving.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_cli_port_in_use_and_mtlib_debug(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--model-repository", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
                "--log-level", "ERROR"]  # fmt: skip
        done = _serve_cli(args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"mtlib-serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; another process listens "
        "there: stop it, or pick another --port (0 picks a free one)"
    ]
    missing = str(tmp_path / "missing")
    quiet = _serve_cli(["--model-repository", missing])
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith(f"mtlib-serve: error: --model-repository {missing} does not exist")
    loud = _serve_cli(["--model-repository", missing], debug=True)
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert f"serving.repository.RepositoryError: {missing} does not exist" in loud.stderr


def test_sigterm_finishes_the_in_flight_request(tmp_path: Path, models: Models) -> None:
    write_config(tmp_path, tiny_config("tiny"))
    write_version(tmp_path, "tiny", 1, models.onnx_a)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "--model-repository",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grpc-port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        port = None
        for line in proc.stderr:  # type: ignore[union-attr]
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, "server did not start"
        dense, ids = random_request(np.random.default_rng(8), 1)
        body, _ = _json_body([{**DENSE, "data": dense.ravel().tolist()}, {**IDS, "data": ids.ravel().tolist()}])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[:20])  # the request is in flight: its body is still uploading
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except OSError:
                return True
            return False

        wait_for(refused, what="the server to stop accepting connections")
        time.sleep(0.2)
        assert proc.poll() is None  # still running: it waits for the request in flight
        sock.sendall(body[20:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        sock.close()
        head_text, _, payload = response.partition(b"\r\n\r\n")
        assert head_text.startswith(b"HTTP/1.1 200"), response[:300]
        y = next(o for o in json.loads(payload)["outputs"] if o["name"] == "y")
        np.testing.assert_allclose(
            np.asarray(y["data"], np.float32), torch_outputs(models.module_a, dense, ids)[1].ravel(), atol=1e-6
        )
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ model control


def c_ready(running: Running, name: str) -> bool:
    return raw_http(running, "GET", f"/v2/models/{name}/ready")[0] == 200


def _copy_repo(repo: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(repo, tmp_path / "repo"))


def test_model_control_is_off_by_default_and_none_does_not_poll(repo: Path, models: Models, tmp_path: Path) -> None:
    root = _copy_repo(repo, tmp_path)
    running = Running(ServerOptions(root, host="127.0.0.1", port=0, poll_interval_s=POLL_S, shutdown_timeout_s=1))
    try:
        c = httpclient.InferenceServerClient(running.url)
        for call in (c.load_model, c.unload_model):
            with pytest.raises(InferenceServerException) as err:
                call("tiny")
            assert err.value.status() == "403" and "--model-control-mode" in err.value.message()
        status, _, payload = raw_http(running, "POST", "/v2/repository/models/tiny/unload", b"{}")
        assert status == 403 and "explicit" in json.loads(payload)["error"]
        good_tiny_request(c, models.module_a)  # still serving
        write_config(root, tiny_config("late"))  # a model written after start: mode none does not rescan
        write_version(root, "late", 1, models.onnx_a)
        time.sleep(5 * POLL_S)
        assert not c.is_model_ready("late")
        c.close()
    finally:
        running.stop()
    running = Running(ServerOptions(root, host="127.0.0.1", port=0, poll_interval_s=POLL_S, shutdown_timeout_s=1,
                                    model_control_mode="poll"))  # fmt: skip
    try:
        c = httpclient.InferenceServerClient(running.url)
        write_config(root, tiny_config("later"))
        write_version(root, "later", 1, models.onnx_a)
        wait_for(lambda: c.is_model_ready("later"), what="poll mode to pick up a new model")
        with pytest.raises(InferenceServerException) as err:
            c.unload_model("later")
        assert err.value.status() == "403"
        c.close()
    finally:
        running.stop()


def test_control_token_and_model_names(repo: Path, models: Models, tmp_path: Path) -> None:
    root = _copy_repo(repo, tmp_path)
    running = Running(ServerOptions(root, host="127.0.0.1", port=0, poll_interval_s=0, shutdown_timeout_s=1,
                                    model_control_mode="explicit", control_token="s3cret"))  # fmt: skip
    try:
        c = httpclient.InferenceServerClient(running.url)
        for headers, why in ((None, "no control token"), ({"Authorization": "Bearer nope"}, "wrong control token")):
            with pytest.raises(InferenceServerException) as err:
                c.unload_model("spare", headers=headers)
            assert err.value.status() == "403" and why in err.value.message()
        assert c.is_model_ready("spare")
        c.unload_model("spare", headers={"Authorization": "Bearer s3cret"})
        assert not c.is_model_ready("spare")
        c.load_model("spare", headers={"mtlib-control-token": "s3cret"})
        assert c.is_model_ready("spare")
        good_tiny_request(c, models.module_a)
        c.close()
        auth = {"Authorization": "Bearer s3cret"}
        (tmp_path / "outside").mkdir()
        write_config(tmp_path / "outside", tiny_config("evil"))  # a config outside the repository
        for name in ("..", ".hidden", "a" * 129, "sp%20ace", "%00", "%2e%2e"):
            status, _, payload = raw_http(running, "POST", f"/v2/repository/models/{name}/load", b"{}", auth)
            assert status == 400 and "invalid model name" in json.loads(payload)["error"], (name, payload)
        for path in ("a/b", "..%2Foutside%2Fevil", "%2E%2E/outside/evil"):  # a slash, decoded or not: no such route
            status, _, payload = raw_http(running, "POST", f"/v2/repository/models/{path}/load", b"{}", auth)
            assert status == 404 and "no endpoint" in json.loads(payload)["error"], (path, payload)
        assert not c_ready(running, "evil")
        status, _, _ = raw_http(running, "GET", "/v2/health/ready")
        assert status == 200  # and it keeps serving
    finally:
        running.stop()
