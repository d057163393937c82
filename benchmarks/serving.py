"""Serving the exported MMoE: raw ONNX Runtime vs mtlib-serve vs MLServer, side by side on loopback.

    make bench-peers                       # once: MLServer 1.7.1 in its own venv (benchmarks/.mlserver-venv)
    python benchmarks/serving.py           # ~5 min on 2 cores
    python benchmarks/serving.py --quick   # fewer requests (~2 min)

What runs, in one process tree on this machine:

* ``onnxruntime``: ``InferenceSession.run`` in this process (the limit: no network, no serialisation), with the
  session options ``mtlib-serve`` uses (1 intra-op and 1 inter-op thread); concurrency ``c`` = ``c`` threads
  sharing the session (ONNX Runtime sessions are thread-safe and release the GIL).
* ``mtlib-serve``: ``mtlib-serve --model-repository REPO --http-server F`` in a subprocess, once per front end
  ``F`` (``--front-ends``, default ``builtin uvicorn aiohttp``: mtlib's own HTTP/1.1 code, the ASGI app of
  :mod:`serving.http_asgi` on uvicorn with httptools, aiohttp's low-level server; all on uvloop); requests in
  the binary tensor format that ``tritonclient.http`` sends by default (``mtlib-serve F (binary)``), and for
  the built-in front end also as plain JSON tensors (``mtlib-serve builtin (json)``) and over gRPC
  (``mtlib-serve grpc``: ``ModelInferRequest`` with ``raw_input_contents``, as ``tritonclient.grpc`` sends
  it, on ``--grpc-port``); dynamic batching as exported (config.pbtxt). ``mtlib-serve grpc ServerLive`` is an
  empty call, the floor of grpcio itself (client and server) on this machine.
* ``mlserver``: MLServer 1.7.1 in a subprocess of its own venv, serving the same ``model.onnx`` through a small
  ``MLModel`` that wraps ONNX Runtime with the same session options; JSON tensors over HTTP and the same
  ``ModelInferRequest`` over its gRPC endpoint (the V2 protocol it speaks). It is run with
  ``parallel_workers=0`` (inference in the server process) and with its default of one parallel worker
  process; the faster configuration is the one the targets compare against, and all are in the JSON.

The load generator is one process: over HTTP, one asyncio loop with ``c`` keep-alive HTTP/1.1 connections (at
``c = 1`` one blocking socket, the cheapest client); over gRPC, one channel with ``c`` ``grpc.aio`` coroutines
(at ``c = 1`` grpcio's blocking stub). Each sends a pre-encoded request and reads the whole response before the
next (closed loop); latency is per request, ``rps`` is requests per second over the run. Every configuration
is checked once for correctness: the served outputs must equal ``session.run``'s on the same inputs. The
model: ``mtrec-train`` defaults (MMoE on the synthetic click log) for a few hundred steps, exported with
``mtrec-export``.

Targets (issues 4 and 15): p50 overhead over raw ONNX Runtime at batch 1 and concurrency 1 <= 0.3 ms over
HTTP and <= 0.4 ms over gRPC; at concurrency 64, batch 1, HTTP binary >= 8x the best MLServer configuration,
JSON >= 3x, gRPC >= 3x MLServer's gRPC; the built-in front end >= 1.3x the best library front end at c = 64
and no slower at c = 1 (else the library becomes the default). Writes ``benchmarks/results/serving.json``
``{"settings": {..., "checks"}, "results": [{"system", "protocol", "front_end", "concurrency", "batch",
"p50_ms", "p99_ms", "rps"}, ...]}`` and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, RESULTS, table, write_json

VENV_BIN = Path(sys.executable).parent
MLSERVER = REPO / "benchmarks" / ".mlserver-venv" / "bin" / "mlserver"
MODEL = "mmoe"

MLSERVER_MODEL_PY = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    """ONNX Runtime behind MLServer, with mtlib-serve's session options (1 intra-op, 1 inter-op thread)."""

    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, so, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(self._outputs, outs)],
        )
'''

# ------------------------------------------------------------------------------------------------ model and data


def build_repository(work: Path, steps: int) -> Path:
    """Train the default MMoE briefly and export it: ``work/repo/mmoe/1/model.onnx``."""
    run_dir, repo = work / "run", work / "repo"
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    subprocess.run(
        [
            str(VENV_BIN / "mtrec-train"),
            f"hydra.run.dir={run_dir}",
            f"trainer.max_steps={steps}",
            "trainer.progress=false",
            "trainer.tensorboard=false",
        ],
        check=True,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [str(VENV_BIN / "mtrec-export"), f"run_dir={run_dir}", f"repository={repo}", f"model_name={MODEL}"],
        check=True,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return repo


def make_inputs(session: Any, batch: int, seed: int, vocab: dict[str, int]) -> dict[str, np.ndarray]:
    """Valid random inputs for every session input: ids below their table size, lengths within the padding."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        if inp.type == "tensor(float)":
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        elif inp.name.endswith("_lengths"):
            feature = inp.name[: -len("_lengths")]
            width = next(i.shape[1] for i in session.get_inputs() if i.name == f"{feature}_ids")
            feeds[inp.name] = rng.integers(1, width + 1, size=shape, dtype=np.int64)
        else:
            feature = inp.name[: -len("_ids")] if inp.name.endswith("_ids") else inp.name
            feeds[inp.name] = rng.integers(0, vocab.get(feature, 2), size=shape, dtype=np.int64)
    return feeds


def vocab_sizes(repo: Path) -> dict[str, int]:
    meta = json.loads((repo / MODEL / "features.json").read_text())
    spec = meta.get("features", meta)
    return {f["name"]: int(f["num_embeddings"]) for f in spec.get("sparse", [])}


# ------------------------------------------------------------------------------------------------ request bodies

_V2_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float16): "FP16"}


def json_body(feeds: dict[str, np.ndarray]) -> bytes:
    inputs = [
        {"name": k, "shape": list(v.shape), "datatype": _V2_TYPES[v.dtype], "data": v.reshape(-1).tolist()}
        for k, v in feeds.items()
    ]
    return json.dumps({"inputs": inputs}).encode()


def binary_body(feeds: dict[str, np.ndarray], outputs: list[str]) -> tuple[bytes, int]:
    """The Triton binary tensor extension, as tritonclient.http builds it: JSON header then raw tensors."""
    inputs = [
        {
            "name": k,
            "shape": list(v.shape),
            "datatype": _V2_TYPES[v.dtype],
            "parameters": {"binary_data_size": v.nbytes},
        }
        for k, v in feeds.items()
    ]
    header = json.dumps(
        {"inputs": inputs, "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs]}
    ).encode()
    return header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values()), len(header)


def decode_response(raw: bytes, header_len: int | None) -> dict[str, np.ndarray]:
    """Outputs of a V2 response (JSON, or binary with ``Inference-Header-Content-Length``)."""
    head = json.loads(raw[:header_len] if header_len else raw)
    out, offset = {}, header_len or 0
    for o in head["outputs"]:
        dtype = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16, "FP64": np.float64}[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(raw[offset : offset + size], dtype=dtype)
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


# ------------------------------------------------------------------------------------------------ load generator


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        raise RuntimeError(f"response without a length: {headers}")
    return status, headers, body


def http_request(port: int, path: str, body: bytes, extra: dict[str, str]) -> bytes:
    headers = {"Content-Type": "application/octet-stream", **extra}  # extra may set its own Content-Type
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    return head.encode() + body


async def _closed_loop(port: int, request: bytes, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    per_conn = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]

    async def conn(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                writer.write(request)
                status, _, body = await _read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(conn(n) for n in per_conn if n))
    return latencies, time.perf_counter() - start


def _blocking_loop(port: int, request: bytes, total: int) -> tuple[list[float], float]:
    """One keep-alive connection with a blocking socket: the cheapest client, so that at concurrency 1 the
    latency is the server's (plus the loopback), not the client's event loop."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies: list[float] = []
    buf = b""
    start = time.perf_counter()
    try:
        for _ in range(total):
            t0 = time.perf_counter()
            sock.sendall(request)
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:"))
            while len(buf) < length:
                buf += sock.recv(65536)
            body, buf = buf[:length], buf[length:]
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    finally:
        sock.close()
    return latencies, time.perf_counter() - start


def run_http(port: int, request: bytes, concurrency: int, total: int, warmup: int) -> tuple[list[float], float]:
    if concurrency == 1:
        _blocking_loop(port, request, warmup)
        return _blocking_loop(port, request, total)
    asyncio.run(_closed_loop(port, request, concurrency, warmup))
    return asyncio.run(_closed_loop(port, request, concurrency, total))


def run_raw(session: Any, feeds: dict[str, np.ndarray], concurrency: int, total: int, warmup: int):
    for _ in range(warmup):
        session.run(None, feeds)
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]

    def work(n: int) -> None:
        local = []
        for _ in range(n):
            t0 = time.perf_counter()
            session.run(None, feeds)
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=work, args=(n,)) for n in per_thread if n]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - start


GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_LIVE = "/inference.GRPCInferenceService/ServerLive"
_GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def grpc_request(feeds: dict[str, np.ndarray], outputs: list[str]) -> bytes:
    """A serialised ``ModelInferRequest`` as ``tritonclient.grpc`` builds it: every input in raw_input_contents."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, v in feeds.items():
        req.inputs.add(name=name, datatype=_V2_TYPES[v.dtype], shape=list(v.shape))
        req.raw_input_contents.append(np.ascontiguousarray(v).tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    return req.SerializeToString()


def grpc_outputs(raw: bytes) -> dict[str, np.ndarray]:
    """The outputs of a serialised ``ModelInferResponse`` (raw_output_contents or typed contents)."""
    from tritonclient.grpc import service_pb2

    resp = service_pb2.ModelInferResponse.FromString(raw)
    out = {}
    for i, o in enumerate(resp.outputs):
        dtype = {"FP32": np.float32, "INT64": np.int64, "FP64": np.float64}[o.datatype]
        if resp.raw_output_contents:
            arr = np.frombuffer(resp.raw_output_contents[i], dtype=dtype)
        else:
            field = {"FP32": "fp32_contents", "INT64": "int64_contents", "FP64": "fp64_contents"}[o.datatype]
            arr = np.asarray(getattr(o.contents, field), dtype=dtype)
        out[o.name] = arr.reshape(list(o.shape))
    return out


def run_grpc(
    port: int, request: bytes, concurrency: int, total: int, warmup: int, method: str = GRPC_INFER
) -> tuple[list[float], float]:
    """Closed loop over one channel: at ``c = 1`` grpcio's blocking stub (its cheapest client), else ``c`` coroutines
    of a ``grpc.aio`` channel in this process; the request is pre-serialised, the response not decoded."""
    import grpc

    if concurrency == 1:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
            call = channel.unary_unary(method)
            for _ in range(warmup):
                call(request)
            latencies = []
            start = time.perf_counter()
            for _ in range(total):
                t0 = time.perf_counter()
                call(request)
                latencies.append(time.perf_counter() - t0)
            return latencies, time.perf_counter() - start

    async def closed(n_total: int) -> tuple[list[float], float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
            call = channel.unary_unary(method)
            latencies: list[float] = []
            per = [n_total // concurrency + (1 if i < n_total % concurrency else 0) for i in range(concurrency)]

            async def worker(n: int) -> None:
                for _ in range(n):
                    t0 = time.perf_counter()
                    await call(request)
                    latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(worker(n) for n in per if n))
            return latencies, time.perf_counter() - start

    asyncio.run(closed(warmup))
    return asyncio.run(closed(total))


def summary(
    system: str,
    concurrency: int,
    batch: int,
    lat: list[float],
    elapsed: float,
    protocol: str = "http",
    front_end: str = "builtin",
) -> dict[str, Any]:
    lat_ms = sorted(x * 1e3 for x in lat)
    p99 = lat_ms[min(len(lat_ms) - 1, int(round(0.99 * (len(lat_ms) - 1))))]
    return {
        "system": system,
        "protocol": protocol,
        "front_end": front_end,
        "concurrency": concurrency,
        "batch": batch,
        "requests": len(lat_ms),
        "p50_ms": round(statistics.median(lat_ms), 4),
        "p99_ms": round(p99, 4),
        "rps": round(len(lat_ms) / elapsed, 1),
        "rows_per_s": round(len(lat_ms) * batch / elapsed, 1),
    }


# ------------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_mtlib(repo: Path, port: int, log: Path, front_end: str = "builtin", grpc_port: int = 0) -> subprocess.Popen:
    cmd = [
        str(VENV_BIN / "mtlib-serve"),
        "--model-repository",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        "--repository-poll-secs",
        "0",
        "--http-server",
        front_end,
        "--grpc-port",
        str(grpc_port),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_ready(port, proc, "mtlib-serve")
    return proc


def start_mlserver(
    repo: Path, work: Path, port: int, parallel_workers: int, log: Path, grpc_port: int
) -> subprocess.Popen:
    root = work / f"mlserver_{parallel_workers}"
    model_dir = root / MODEL
    model_dir.mkdir(parents=True, exist_ok=True)
    (root / "onnx_model.py").write_text(MLSERVER_MODEL_PY)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": grpc_port,
                "metrics_port": free_port(),
                "parallel_workers": parallel_workers,
                "debug": False,
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL,
                "implementation": "onnx_model.OnnxModel",
                "parameters": {"uri": str(repo / MODEL / "1" / "model.onnx")},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [str(MLSERVER), "start", str(root)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=root
    )
    wait_ready(port, proc, "MLServer")
    return proc


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per configuration")
    ap.add_argument("--requests", type=int, default=None, help="requests per configuration at batch 1")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--no-mlserver", action="store_true")
    ap.add_argument(
        "--front-ends", nargs="+", default=["builtin", "uvicorn", "aiohttp"], help="mtlib-serve --http-server values"
    )
    ap.add_argument("--output", default="serving")
    args = ap.parse_args()
    n1 = args.requests or (1000 if args.quick else 3000)

    import onnxruntime as ort

    work = Path(tempfile.mkdtemp(prefix="serving_bench_"))
    print(f"training and exporting the default MMoE ({args.train_steps} steps) in {work} ...", flush=True)
    repo = build_repository(work, args.train_steps)
    onnx_path = repo / MODEL / "1" / "model.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    vocab = vocab_sizes(repo)
    feeds = {b: make_inputs(session, b, seed=b, vocab=vocab) for b in args.batches}
    expected = {b: dict(zip(outputs, session.run(None, feeds[b]))) for b in args.batches}

    def requests_for(batch: int) -> int:
        return max(200, n1 // max(1, batch // 8))

    results: list[dict[str, Any]] = []
    plan = [(c, b) for b in args.batches for c in args.concurrency]

    def record(row: dict[str, Any]) -> None:
        results.append(row)
        print(
            f"  {row['system']:<22} c={row['concurrency']:<3} batch={row['batch']:<4} p50 {row['p50_ms']:.3f} ms  "
            f"p99 {row['p99_ms']:.3f} ms  {row['rps']:.0f} req/s",
            flush=True,
        )

    print("onnxruntime (in-process) ...", flush=True)
    for c, b in plan:
        lat, el = run_raw(session, feeds[b], c, requests_for(b), warmup=50)
        record(summary("onnxruntime", c, b, lat, el, protocol="in-process", front_end="none"))

    def check(system: str, b: int, got: dict[str, np.ndarray]) -> None:
        for name in outputs:
            if not np.array_equal(got[name].reshape(expected[b][name].shape), expected[b][name]):
                diff = float(np.abs(got[name].reshape(expected[b][name].shape) - expected[b][name]).max())
                raise SystemExit(f"{system}: output {name!r} at batch {b} differs from session.run by {diff}")

    def bench_server(
        system: str,
        port: int,
        encode: Callable[[int], tuple[bytes, dict[str, str]]],
        header_of: Callable[[dict[str, str]], int | None],
        front_end: str,
    ) -> None:
        for b in args.batches:  # correctness first: the served outputs equal session.run's
            body, extra = encode(b)
            raw = urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", data=body, headers=extra),
                timeout=30,
            )
            check(system, b, decode_response(raw.read(), header_of(dict(raw.headers))))
        for c, b in plan:
            body, extra = encode(b)
            request = http_request(port, f"/v2/models/{MODEL}/infer", body, extra)
            lat, el = run_http(port, request, c, requests_for(b), warmup=min(100, 4 * c))
            record(summary(system, c, b, lat, el, "http", front_end))

    def bench_grpc(system: str, port: int, front_end: str, floor: bool = False) -> None:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
            call = channel.unary_unary(GRPC_INFER)
            for b in args.batches:
                check(system, b, grpc_outputs(call(grpc_request(feeds[b], outputs), timeout=30)))
        if floor:  # an empty call: the cost of grpcio itself, client and server, on this machine
            lat, el = run_grpc(port, b"", 1, n1, 100, GRPC_LIVE)
            record(summary(f"{system} ServerLive", 1, 0, lat, el, "grpc", front_end))
        for c, b in plan:
            lat, el = run_grpc(port, grpc_request(feeds[b], outputs), c, requests_for(b), min(100, 4 * c))
            record(summary(system, c, b, lat, el, "grpc", front_end))

    def binary(b: int) -> tuple[bytes, dict[str, str]]:
        body, hlen = binary_body(feeds[b], outputs)
        return body, {"Inference-Header-Content-Length": str(hlen)}

    def plain(b: int) -> tuple[bytes, dict[str, str]]:
        return json_body(feeds[b]), {"Content-Type": "application/json"}

    def header_len(h: dict[str, str]) -> int | None:
        v = {k.lower(): x for k, x in h.items()}.get("inference-header-content-length")
        return int(v) if v is not None else None

    count = execs = 0.0
    for front_end in args.front_ends:
        port, gport = free_port(), free_port()
        print(f"mtlib-serve --http-server {front_end} ...", flush=True)
        proc = start_mtlib(repo, port, work / f"mtlib_{front_end}.log", front_end, gport)
        try:
            bench_server(f"mtlib-serve {front_end} (binary)", port, binary, header_len, front_end)
            if front_end == "builtin":
                bench_server("mtlib-serve builtin (json)", port, plain, header_len, front_end)
                bench_grpc("mtlib-serve grpc", gport, "grpc.aio", floor=True)
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
                count = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith("nv_inference_count{")
                )
                execs = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith("nv_inference_exec_count{")
                )
        finally:
            stop(proc)
    avg_batch = count / execs if execs else float("nan")
    print(f"mtlib-serve dynamic batching: {count:.0f} rows in {execs:.0f} executions (mean batch {avg_batch:.2f})")

    mlserver_note = None
    if args.no_mlserver:
        mlserver_note = "--no-mlserver"
    elif not MLSERVER.exists():
        mlserver_note = f"MLServer not installed at {MLSERVER} (make bench-peers)"
    else:
        for workers in (0, 1):
            port, gport = free_port(), free_port()
            print(f"MLServer (parallel_workers={workers}) ...", flush=True)
            try:
                proc = start_mlserver(repo, work, port, workers, work / f"mlserver_{workers}.log", gport)
            except RuntimeError as err:
                log = work / f"mlserver_{workers}.log"
                tail = log.read_text()[-1500:] if log.exists() else ""
                print(f"  skipped: {err}\n{tail}")
                continue
            try:
                bench_server(f"mlserver (json, workers={workers})", port, plain, header_len, "uvicorn (fastapi)")
                bench_grpc(f"mlserver grpc (workers={workers})", gport, "grpc.aio")
            finally:
                stop(proc)
    if mlserver_note:
        print(f"NOTE: {mlserver_note}")

    # ---------------------------------------------------------------------------------------------- report
    def row(system: str, c: int, b: int) -> dict[str, Any] | None:
        return next((r for r in results if r["system"] == system and r["concurrency"] == c and r["batch"] == b), None)

    systems = list(dict.fromkeys(r["system"] for r in results))
    headers = [
        "system",
        "batch",
        *(f"c={c} p50 ms" for c in args.concurrency),
        *(f"c={c} req/s" for c in args.concurrency),
        "c=1 p99 ms",
    ]
    rows = []
    for s in systems:
        for b in args.batches:
            rs = [row(s, c, b) for c in args.concurrency]
            if not any(rs):
                continue
            rows.append(
                [
                    s,
                    b,
                    *(f"{r['p50_ms']:.3f}" if r else "-" for r in rs),
                    *(f"{r['rps']:.0f}" if r else "-" for r in rs),
                    f"{rs[0]['p99_ms']:.3f}" if rs[0] else "-",
                ]
            )
    print()
    print(table(headers, rows))

    checks: dict[str, Any] = {}
    cmax = max(args.concurrency)

    def verdict(key: str, value: float, ok: bool, text: str) -> None:
        checks[key] = {"value": round(value, 4), "met": ok}
        print(f"{'PASS' if ok else 'FAIL'} {text}")

    raw1 = row("onnxruntime", 1, 1)
    for name, target in (("mtlib-serve builtin (binary)", 0.3), ("mtlib-serve grpc", 0.4)):
        srv1 = row(name, 1, 1)
        if raw1 and srv1:
            overhead = srv1["p50_ms"] - raw1["p50_ms"]
            verdict(
                f"p50_overhead_ms_batch1_c1[{name}]",
                overhead,
                overhead <= target,
                f"p50 overhead of {name} over session.run, batch 1, c=1: {overhead:.3f} ms (target <= {target} ms)",
            )
    floor = row("mtlib-serve grpc ServerLive", 1, 0)
    if floor:
        print(f"     (grpcio's own floor here: an empty ServerLive call takes {floor['p50_ms']:.3f} ms p50)")

    # The front end must earn its place: >= 1.3x the best library at c = cmax, no slower at c = 1 (batch 1).
    own = [row("mtlib-serve builtin (binary)", c, 1) for c in (1, cmax)]
    libs = [f for f in args.front_ends if f != "builtin"]
    if all(own) and libs:
        best_hi = max((row(f"mtlib-serve {f} (binary)", cmax, 1) for f in libs), key=lambda r: r["rps"])
        best_lo = min((row(f"mtlib-serve {f} (binary)", 1, 1) for f in libs), key=lambda r: r["p50_ms"])
        ratio = own[1]["rps"] / best_hi["rps"]
        verdict(
            f"front_end_throughput_ratio_c{cmax}",
            ratio,
            ratio >= 1.3,
            f"built-in front end at c={cmax}: {own[1]['rps']:.0f} req/s = {ratio:.2f}x the best library "
            f"({best_hi['front_end']}, {best_hi['rps']:.0f} req/s; target >= 1.3x)",
        )
        verdict(
            "front_end_p50_ms_c1_minus_best_library",
            own[0]["p50_ms"] - best_lo["p50_ms"],
            own[0]["p50_ms"] <= best_lo["p50_ms"],
            f"built-in front end at c=1: p50 {own[0]['p50_ms']:.3f} ms vs {best_lo['p50_ms']:.3f} ms for the fastest "
            f"library ({best_lo['front_end']}; target: no slower)",
        )

    def best_of(names: list[str]) -> dict[str, Any] | None:
        rows_ = [r for r in (row(n, cmax, 1) for n in names) if r]
        return max(rows_, key=lambda r: r["rps"]) if rows_ else None

    best_ml = best_of(
        [f"mlserver (json, workers={w})" for w in (0, 1)] + [f"mlserver grpc (workers={w})" for w in (0, 1)]
    )
    best_ml_grpc = best_of([f"mlserver grpc (workers={w})" for w in (0, 1)])
    for name, peer, target in (
        ("mtlib-serve builtin (binary)", best_ml, 8.0),
        ("mtlib-serve builtin (json)", best_ml, 3.0),
        ("mtlib-serve grpc", best_ml_grpc, 3.0),
    ):
        ours = row(name, cmax, 1)
        if ours and peer:
            ratio = ours["rps"] / peer["rps"]
            verdict(
                f"throughput_ratio_c{cmax}[{name} / {peer['system']}]",
                ratio,
                ratio >= target,
                f"{name} at c={cmax}, batch 1: {ours['rps']:.0f} req/s = {ratio:.1f}x {peer['system']} "
                f"({peer['rps']:.0f} req/s; target >= {target:g}x)",
            )

    settings = {
        "model": "mtrec-train defaults (MMoE, synthetic click log), exported by mtrec-export",
        "train_steps": args.train_steps,
        "requests_batch1": n1,
        "concurrency": args.concurrency,
        "batches": args.batches,
        "ort_session": "CPUExecutionProvider, intra_op_num_threads=1, inter_op_num_threads=1",
        "client": "one process, closed loop, pre-encoded requests; HTTP: keep-alive HTTP/1.1 connections (asyncio, a "
        "blocking socket at c=1); gRPC: one channel, grpc.aio coroutines (grpcio's blocking stub at c=1)",
        "front_ends": args.front_ends,
        "event_loop": "uvloop (mtlib-serve runs every front end on it when installed)",
        "mtlib_dynamic_batching": {"rows": count, "executions": execs, "mean_batch": avg_batch},
        "mlserver": mlserver_note or "1.7.1, custom MLModel over onnxruntime, parallel_workers 0 and 1",
        "cpu_count": os.cpu_count(),
        "checks": checks,
    }
    write_json(f"{args.output}.json", {"settings": settings, "results": results})
    plot(results, args, RESULTS / f"{args.output}.png")
    shutil.rmtree(work, ignore_errors=True)


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(args.batches), figsize=(5 * len(args.batches), 4), squeeze=False)
    for ax, b in zip(axes[0], args.batches):
        for s in dict.fromkeys(r["system"] for r in results):
            pts = sorted((r["concurrency"], r["rps"]) for r in results if r["system"] == s and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel("requests / s")
        ax.set_title(f"batch {b} per request")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
