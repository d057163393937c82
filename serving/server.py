"""``mtlib-serve``: an Open Inference Protocol (KServe v2) HTTP server for a Triton-layout ONNX repository.

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

Each served version owns ``instance_group.count`` ONNX Runtime sessions behind a
:class:`~serving.batching.DynamicBatcher`; without a version in the URL a request goes to the highest
served version. The repository is polled (``--repository-poll-secs``): a new version directory goes live
once its ``model.onnx`` loads and checks out against ``config.pbtxt``; the version it replaces is taken
out of routing first and closed only after its queued requests finish. A version that fails to load is
logged and listed in the index, and the versions already serving keep serving. SIGTERM or SIGINT stop
accepting connections, let in-flight requests finish (``--shutdown-timeout``), then exit.

HTTP: a small built-in HTTP/1.1 implementation on ``asyncio`` (:class:`HttpConnection`: keep-alive,
pipelining, ``Content-Length`` and chunked bodies, ``Expect: 100-continue``) is the default because it costs
about a third of aiohttp's per-request CPU, which dominates the latency of small models;
``--http-server aiohttp`` serves the same endpoints (:class:`InferenceService`) through aiohttp instead.
Batching and where a batch runs (worker thread, or inline on the loop for sub-50-us batches): see
:mod:`serving.batching`.

Thread settings: ``--intra-op-threads`` / ``--inter-op-threads`` (default 1: batch-invariant results and no
oversubscription when several instances run at once), overridden per model by the ``config.pbtxt``
parameters Triton's onnxruntime backend reads, ``intra_op_thread_count``, ``inter_op_thread_count`` and
``execution_mode`` (0 sequential, 1 parallel). Execution providers: TensorRT then CUDA when
onnxruntime-gpu sees a GPU and ``instance_group.kind`` is not ``KIND_CPU``, else CPU; the parameter
``execution_providers`` (comma separated) overrides the list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from serving.batching import BatcherClosed, DynamicBatcher, Runner
from serving.metrics import CONTENT_TYPE, InferenceStats, MetricsRegistry
from serving.protocol import (
    InferenceError,
    Signature,
    decompress,
    encode_infer_response,
    error_body,
    json_dumps,
    parse_infer_request,
)
from serving.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    TRITON_TO_V2,
    ConfigError,
    ModelConfig,
    available_versions,
    model_names,
    read_config,
    served_versions,
)

log = logging.getLogger("mtlib.serve")

SERVER_NAME = "mtlib"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration"]
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _server_version() -> str:
    try:
        from importlib.metadata import version

        return version("mtlib")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "0.1.0"


@dataclass
class ServerOptions:
    """Command-line settings of :func:`serve` (see ``mtlib-serve --help``)."""

    model_repository: Path
    host: str = "0.0.0.0"
    port: int = 8000
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
    """``builtin`` (:class:`HttpConnection`, the fast path) or ``aiohttp``."""
    keepalive_timeout_s: float = 75.0
    """Idle keep-alive connections are closed after this long (built-in HTTP server)."""
    inline_max_us: float = 50.0
    """Run a batch on the event loop instead of a worker thread when the model version is otherwise idle and the
    batch is expected to take at most this long (see :mod:`serving.batching`); 0: always a worker thread."""


# --------------------------------------------------------------------------------------- ONNX Runtime sessions


def choose_providers(cfg: ModelConfig, available: list[str]) -> list[str]:
    """Execution providers for a model's sessions, best first.

    The ``execution_providers`` parameter wins; otherwise ``KIND_CPU`` gets the CPU provider and any other
    kind gets TensorRT and CUDA where ``available`` (``onnxruntime.get_available_providers()``) has them,
    then CPU. ``KIND_GPU`` without a GPU provider is a load error, as in Triton.
    """
    override = cfg.parameters.get("execution_providers")
    if override:
        names = [p.strip() for p in override.split(",") if p.strip()]
        missing = [p for p in names if p not in available]
        if missing:
            raise ConfigError(
                f"model {cfg.name!r}: parameter execution_providers names {missing}, not available in this "
                f"onnxruntime build (available: {available})"
            )
        return names
    if cfg.instance_kind == "KIND_CPU":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if cfg.instance_kind == "KIND_GPU" and not gpu:
        raise ConfigError(
            f"model {cfg.name!r}: instance_group kind KIND_GPU but onnxruntime offers no GPU provider "
            f"(available: {available}); install onnxruntime-gpu or use KIND_CPU"
        )
    return [*gpu, "CPUExecutionProvider"]


def _int_param(cfg: ModelConfig, key: str, default: int) -> int:
    raw = cfg.parameters.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"model {cfg.name!r}: parameter {key} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"model {cfg.name!r}: parameter {key} must be >= 0, got {value}")
    return value


def create_session(model: bytes, cfg: ModelConfig, options: ServerOptions, source: str) -> Any:
    """One ``onnxruntime.InferenceSession`` for ``model`` (the bytes of ``model.onnx``) set up from ``cfg``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = _int_param(cfg, "intra_op_thread_count", options.intra_op_threads)
    so.inter_op_num_threads = _int_param(cfg, "inter_op_thread_count", options.inter_op_threads)
    mode = _int_param(cfg, "execution_mode", 0)
    if mode not in (0, 1):
        raise ConfigError(f"model {cfg.name!r}: parameter execution_mode must be 0 (sequential) or 1, got {mode}")
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode else ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: a bad request's kernel failure is reported to its client instead
    providers = choose_providers(cfg, ort.get_available_providers())
    session = ort.InferenceSession(model, sess_options=so, providers=providers)
    if cfg.instance_kind == "KIND_GPU" and not any(p in session.get_providers() for p in GPU_PROVIDERS):
        raise ConfigError(f"{source}: KIND_GPU requested but no GPU provider could start ({session.get_providers()})")
    return session


def check_model_io(session: Any, cfg: ModelConfig, source: str) -> None:
    """Refuse a ``model.onnx`` whose inputs or outputs disagree with ``config.pbtxt`` (names, datatypes, ranks,
    fixed dims, a batch axis when ``max_batch_size > 0``), so a mismatch fails at load, not per request."""
    batching = cfg.max_batch_size > 0
    for kind, declared, actual in (
        ("input", cfg.inputs, session.get_inputs()),
        ("output", cfg.outputs, session.get_outputs()),
    ):
        by_name = {a.name: a for a in actual}
        for t in declared:
            a = by_name.get(t.name)
            if a is None:
                raise ConfigError(f"{source}: config.pbtxt declares {kind} {t.name!r}; model.onnx has {list(by_name)}")
            datatype = ORT_TO_V2.get(a.type)
            if datatype != t.datatype:
                raise ConfigError(
                    f"{source}: {kind} {t.name!r} is {a.type} in model.onnx ({datatype}) but {t.datatype} in "
                    f"config.pbtxt"
                )
            expected = ((-1,) if batching else ()) + tuple(t.dims)
            shape = list(a.shape)
            if len(shape) != len(expected):
                raise ConfigError(
                    f"{source}: {kind} {t.name!r} has rank {len(shape)} in model.onnx ({shape}) but config.pbtxt "
                    f"implies shape {list(expected)}" + (" (batch axis first)" if batching else "")
                )
            for axis, (got, want) in enumerate(zip(shape, expected)):
                fixed = isinstance(got, int) and got >= 0
                if batching and axis == 0:
                    if fixed and got < cfg.max_batch_size:
                        raise ConfigError(
                            f"{source}: {kind} {t.name!r} has a fixed batch axis of {got} in model.onnx but "
                            f"max_batch_size is {cfg.max_batch_size}; export it with a dynamic batch axis"
                        )
                elif fixed and got != want:
                    raise ConfigError(
                        f"{source}: {kind} {t.name!r} axis {axis} is {got} in model.onnx but {want} in config.pbtxt"
                    )
        if kind == "input":
            extra = [n for n in by_name if n not in {t.name for t in declared}]
            if extra:
                raise ConfigError(f"{source}: model.onnx needs inputs {extra} that config.pbtxt does not declare")


def make_runner(session: Any, batching: bool) -> Runner:
    """``session.run`` as a batcher runner: ONNX Runtime's INVALID_ARGUMENT (a bad index, a wrong size the
    config allowed) becomes a 400 for the request, anything else a 500; with batching, every output must have
    as many rows as the batch, or requests would get each other's rows."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    run = session.run
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # a request's own failure goes back to it, not to the server log

    def runner(feed: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        try:
            arrays = run(outputs, feed, run_options)
        except InvalidArgument as err:
            raise InferenceError(f"the model rejected the request: {err}", 400) from None
        except Exception as err:
            raise InferenceError(f"inference failed: {err}", 500) from None
        if batching:
            rows = next(iter(feed.values())).shape[0]
            for name, arr in zip(outputs, arrays):
                if arr.ndim == 0 or arr.shape[0] != rows:
                    raise InferenceError(
                        f"model output {name!r} has shape {list(arr.shape)} for a batch of {rows} rows; outputs of a "
                        "batching model must keep the batch axis first",
                        500,
                    )
        return arrays

    return runner


# -------------------------------------------------------------------------------------------- model versions


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelVersion:
    """One served version: its config, sessions and batcher, and the identity of the file it came from."""

    def __init__(
        self,
        cfg: ModelConfig,
        version: int,
        sessions: list[Any],
        file_id: Any,
        stats: InferenceStats,
        inline_max_us: float = 0.0,
    ) -> None:
        self.name = cfg.name
        self.version = version
        self.version_str = str(version)
        self.cfg = cfg
        self.signature = Signature(cfg)
        self.datatypes = {t.name: t.datatype for t in cfg.outputs}
        self.file_id = file_id
        self.sessions = sessions
        self.providers = sessions[0].get_providers()
        self.stats = stats
        batching = cfg.max_batch_size > 0
        self.batcher = DynamicBatcher(
            [make_runner(s, batching) for s in sessions],
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_us=cfg.max_queue_delay_microseconds,
            preferred_batch_sizes=cfg.preferred_batch_size,
            on_execution=stats.executed,
            inline_max_us=inline_max_us,
            name=f"{cfg.name}-v{version}",
        )

    def metadata(self) -> dict[str, Any]:
        sig = self.signature
        return {
            "name": self.name,
            "versions": [self.version_str],
            "platform": self.cfg.platform,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in sig.inputs.values()],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in sig.outputs.values()],
        }

    def config_json(self) -> dict[str, Any]:
        """The config in the JSON form of Triton's ``GET /v2/models/{m}/config`` (``model_config.proto``)."""
        cfg = self.cfg
        v2_to_triton = {v: k for k, v in TRITON_TO_V2.items()}

        def tensors(ts: list[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "data_type": v2_to_triton[t.datatype], "dims": list(t.dims)} for t in ts]

        if cfg.version_policy == "all":
            policy: dict[str, Any] = {"all": {}}
        elif cfg.version_policy == "specific":
            policy = {"specific": {"versions": cfg.specific_versions}}
        else:
            policy = {"latest": {"num_versions": cfg.latest_num_versions}}
        return {
            "name": cfg.name,
            "platform": cfg.platform,
            "backend": "onnxruntime",
            "max_batch_size": cfg.max_batch_size,
            "input": tensors(cfg.inputs),
            "output": tensors(cfg.outputs),
            "dynamic_batching": {
                "preferred_batch_size": cfg.preferred_batch_size,
                "max_queue_delay_microseconds": cfg.max_queue_delay_microseconds,
            },
            "instance_group": [{"count": cfg.instance_count, "kind": cfg.instance_kind}],
            "version_policy": policy,
            "parameters": {k: {"string_value": v} for k, v in cfg.parameters.items()},
        }


def load_version(
    repository: Path, cfg: ModelConfig, version: int, options: ServerOptions, stats: InferenceStats
) -> ModelVersion:
    """Read ``REPO/NAME/VERSION/model.onnx`` once and start ``instance_count`` sessions on those bytes (so
    every instance runs the same model even if the file is replaced meanwhile). Blocking: call it off the
    event loop."""
    path = repository / cfg.name / str(version) / MODEL_FILE
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        model = f.read()
    file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
    source = str(path)
    sessions = [create_session(model, cfg, options, source) for _ in range(max(cfg.instance_count, 1))]
    check_model_io(sessions[0], cfg, source)
    mv = ModelVersion(cfg, version, sessions, file_id, stats, options.inline_max_us)
    for session in sessions:
        elapsed = warm_up(session, cfg)
        if elapsed is not None:
            mv.batcher.observe(elapsed, 1)
    return mv


def warm_up(session: Any, cfg: ModelConfig) -> int | None:
    """Run ``session`` twice on one all-zero row (variable axes of size 1), so the first request does not pay
    ONNX Runtime's first-run allocations; returns the second run's nanoseconds, ``None`` if the model refuses
    zeros (warm-up is best effort)."""
    feed = {}
    for t in cfg.inputs:
        shape = ((1,) if cfg.max_batch_size > 0 else ()) + tuple(max(d, 1) for d in t.dims)
        feed[t.name] = np.full(shape, "", dtype=np.object_) if t.datatype == "BYTES" else np.zeros(shape, t.numpy_dtype)
    names = [t.name for t in cfg.outputs]
    try:
        session.run(names, feed)
        start = time.perf_counter_ns()
        session.run(names, feed)
        return time.perf_counter_ns() - start
    except Exception as err:  # noqa: BLE001 - a model may reject zeros; serving does not depend on warm-up
        log.debug("model %s: warm-up run failed (%s); first request pays the first-run cost", cfg.name, err)
        return None


@dataclass
class _ModelState:
    """What the manager knows about one model directory."""

    name: str
    cfg: ModelConfig | None = None
    config_id: Any = None
    config_error: str | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    broken: dict[int, tuple[Any, str]] = field(default_factory=dict)  # version -> (file id, why it failed)
    loading: set[int] = field(default_factory=set)
    unloaded: bool = False


class ModelManager:
    """The served models of a repository: loading, polling, routing, retiring.

    Routing reads (``get``) happen on the event loop without locks; every change builds the new version table
    first and then swaps it in, so a request sees either the old or the new table, never a half-built one.
    Changes are serialized by one lock.
    """

    def __init__(self, options: ServerOptions, metrics: MetricsRegistry) -> None:
        self.options = options
        self.repository = Path(options.model_repository)
        self.metrics = metrics
        self._models: dict[str, _ModelState] = {}
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self.started = False

    # ---- routing (hot path)

    def get(self, name: str, version: str | None) -> ModelVersion:
        """The version a request for ``name`` (and ``version``, or the latest) goes to; 404 if none serves."""
        state = self._models.get(name)
        if state is None:
            raise InferenceError(f"unknown model {name!r}; the repository has {sorted(self._models)}", 404)
        if version is None:
            mv = state.latest
            if mv is None:
                raise InferenceError(f"model {name!r} is not ready: {self._why_unavailable(state)}", 404)
            return mv
        mv = state.versions.get(int(version)) if version.isdigit() else None
        if mv is None:
            served = sorted(state.versions)
            raise InferenceError(
                f"model {name!r} has no ready version {version!r}; ready versions: {served}"
                + (f" ({self._why_unavailable(state, int(version))})" if version.isdigit() else ""),
                404,
            )
        return mv

    @staticmethod
    def _why_unavailable(state: _ModelState, version: int | None = None) -> str:
        if state.unloaded:
            return "unloaded through the repository API"
        if state.config_error:
            return state.config_error
        if version is not None and version in state.broken:
            return f"version {version} failed to load: {state.broken[version][1]}"
        if version is None and state.broken:
            return "; ".join(f"version {v} failed to load: {why}" for v, (_, why) in sorted(state.broken.items()))
        if state.loading:
            return "loading"
        return "no version directory with a model.onnx that the version policy selects"

    def ready_versions(self, name: str) -> list[int]:
        """The versions of ``name`` that serve now, ascending."""
        state = self._models.get(name)
        return sorted(state.versions) if state is not None else []

    @property
    def ready(self) -> bool:
        """Every model not explicitly unloaded serves at least one version."""
        return self.started and all(s.latest is not None for s in self._models.values() if not s.unloaded)

    # ---- lifecycle

    async def start(self) -> None:
        """Load everything in the repository, then poll it every ``poll_interval_s`` (if > 0)."""
        await self.poll()
        self.started = True
        if self.options.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        """Stop polling, let every queued request finish, release all sessions."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            for state in self._models.values():
                self._install(state, {})
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # a scan must never stop polling
                log.exception("repository scan of %s failed", self.repository)

    async def poll(self) -> None:
        """Bring every model in line with the repository on disk (new, changed and removed versions)."""
        async with self._lock:
            names = set(model_names(self.repository)) | set(self._models)
            for name in sorted(names):
                state = self._models.get(name)
                if state is not None and state.unloaded:
                    continue
                await self._sync(name)

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` now, retrying versions that failed before; 400 if no version serves."""
        async with self._lock:
            if not (self.repository / name / CONFIG_FILE).is_file():
                raise InferenceError(f"no model {name!r} in repository {self.repository} (no {name}/{CONFIG_FILE})")
            state = self._models.setdefault(name, _ModelState(name))
            state.unloaded = False
            state.broken.clear()
            state.config_id = None  # force a re-read of config.pbtxt
            await self._sync(name)
            if state.latest is None:
                raise InferenceError(f"failed to load model {name!r}: {self._why_unavailable(state)}", 400)

    async def unload(self, name: str) -> None:
        """Stop routing to ``name``; returns once its in-flight requests have finished."""
        async with self._lock:
            state = self._models.get(name)
            if state is None:
                raise InferenceError(f"unknown model {name!r}; the repository has {sorted(self._models)}", 404)
            state.unloaded = True
            retiring = self._install(state, {})
        await asyncio.gather(*retiring, return_exceptions=True)

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: one entry per model version (state READY, LOADING or UNAVAILABLE, with
        the reason), and one per model that has no version to list."""
        out: list[dict[str, Any]] = []
        for name in sorted(set(model_names(self.repository)) | set(self._models)):
            state = self._models.get(name)
            if state is None:  # appeared after the last scan
                out.append({"name": name, "state": "UNAVAILABLE", "reason": "not loaded yet"})
                continue
            on_disk = set(available_versions(self.repository, name))
            versions = sorted(on_disk | set(state.versions) | set(state.broken) | state.loading)
            entries = []
            for v in versions:
                entry: dict[str, Any] = {"name": name, "version": str(v)}
                if v in state.versions:
                    entry["state"] = "READY"
                elif v in state.loading:
                    entry["state"] = "LOADING"
                else:
                    entry["state"] = "UNAVAILABLE"
                    if state.unloaded:
                        entry["reason"] = "unloaded"
                    elif v in state.broken:
                        entry["reason"] = f"failed to load: {state.broken[v][1]}"
                    elif state.config_error:
                        entry["reason"] = state.config_error
                    else:
                        entry["reason"] = "not selected by the version policy"
                entries.append(entry)
            if not entries:
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": self._why_unavailable(state)})
            elif state.config_error and state.versions:
                entries.append({"name": name, "state": "READY", "reason": f"serving; {state.config_error}"})
            out.extend(entries)
        return out

    # ---- reconciliation

    async def _sync(self, name: str) -> None:
        state = self._models.setdefault(name, _ModelState(name))
        config_path = self.repository / name / CONFIG_FILE
        config_id = _file_id(config_path)
        if config_id is None:  # the model directory went away: stop serving it
            if state.versions:
                log.info("model %s: %s removed, unloading", name, config_path)
            self._install(state, {})
            del self._models[name]
            return
        cfg = state.cfg
        if config_id != state.config_id:
            try:
                new_cfg = read_config(self.repository, name)
                if new_cfg.max_batch_size < 0:
                    raise ConfigError(f"{config_path}: max_batch_size must be >= 0, got {new_cfg.max_batch_size}")
            except ConfigError as err:
                if state.config_error != str(err):
                    log.error("model %s: %s (still serving versions %s)", name, err, sorted(state.versions))
                state.config_error, state.config_id = str(err), config_id
                return
            state.config_error, state.config_id = None, config_id
            if new_cfg != cfg:
                cfg = state.cfg = new_cfg
        if cfg is None:
            return
        version_dir = self.repository / name
        on_disk = available_versions(self.repository, name)
        file_ids = {v: _file_id(version_dir / str(v) / MODEL_FILE) for v in on_disk}
        for v in [v for v in state.broken if state.broken[v][0] != file_ids.get(v)]:
            del state.broken[v]  # rewritten or removed: worth another try

        def current(mv: ModelVersion) -> bool:
            return mv.cfg == cfg and mv.file_id == file_ids.get(mv.version)

        table = dict(state.versions)
        loop = asyncio.get_running_loop()
        for _ in range(len(on_disk) + 1):
            wanted = served_versions(cfg, [v for v in on_disk if v not in state.broken or v in table])
            todo = [v for v in wanted if v not in state.broken and (v not in table or not current(table[v]))]
            if not todo:
                break
            for v in todo:
                state.loading.add(v)
                stats = self.metrics.stats(name, str(v))
                try:
                    mv = await loop.run_in_executor(None, load_version, self.repository, cfg, v, self.options, stats)
                except Exception as err:
                    reason = str(err) or type(err).__name__
                    state.broken[v] = (file_ids.get(v), reason)
                    kept = f"; still serving {sorted(table)}" if table else ""
                    log.error("model %s version %d failed to load: %s%s", name, v, reason, kept)
                else:
                    table[v] = mv
                    log.info("model %s version %d loaded (%s)", name, v, ", ".join(mv.providers))
                finally:
                    state.loading.discard(v)
        wanted = served_versions(cfg, [v for v in on_disk if v in table])
        self._install(state, {v: table[v] for v in wanted})

    def _install(self, state: _ModelState, table: dict[int, ModelVersion]) -> list[asyncio.Task[None]]:
        """Swap in a new version table; retire (drain, then close) every version object no longer in it."""
        old = state.versions
        state.versions = table
        state.latest = table[max(table)] if table else None
        for mv in table.values():
            mv.stats.pending = lambda b=mv.batcher: b.pending
        gone = [mv for v, mv in old.items() if table.get(v) is not mv]
        tasks = []
        for mv in gone:
            task = asyncio.get_running_loop().create_task(self._retire(mv))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            tasks.append(task)
        return tasks

    @staticmethod
    async def _retire(mv: ModelVersion) -> None:
        await mv.batcher.drain()
        mv.batcher.close()
        mv.sessions.clear()
        log.info("model %s version %d unloaded", mv.name, mv.version)


# -------------------------------------------------------------------------------------------------- HTTP layer

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


def _error(message: str, status: int) -> Reply:
    return Reply(status, error_body(message))


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
            return await self._other_endpoint(method, path, body)
        except InferenceError as err:
            return _error(str(err), err.status)
        except Exception as err:
            log.exception("unhandled error in %s %s", method, path)
            return _error(f"internal server error: {type(err).__name__}: {err}", 500)
        finally:
            self.in_flight -= 1

    async def _model_endpoint(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        parts = path[11:].split("/")
        name, version, rest = parts[0], None, parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else "" if not rest else None
        if not name or version == "" or action is None:
            return _error(f"no endpoint {method} {path}", 404)
        if action == "infer":
            if method != "POST":
                return self._not_allowed(method, path, "POST")
            return await self.infer(name, version, headers, body)
        if action not in ("", "ready", "config"):
            return _error(f"no endpoint {method} {path}", 404)
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

    async def _other_endpoint(self, method: str, path: str, body: bytes) -> Reply:
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
            return _error(f"no endpoint {method} {path}", 404)
        if path not in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
            return _error(f"no endpoint {method} {path}", 404)
        if method not in ("GET", "HEAD"):
            return self._not_allowed(method, path, "GET")
        if path == "/v2/health/live":
            return _EMPTY_OK
        if path == "/v2/health/ready":
            if self.stopping:
                return _error("server is shutting down", 503)
            if not self.manager.ready:
                return _error("not every model in the repository serves a version; see POST /v2/repository/index", 503)
            return _EMPTY_OK
        if path == "/v2":
            return Reply(200, self._server_metadata)
        return Reply(200, self.metrics.render().encode(), CONTENT_TYPE)

    @staticmethod
    def _not_allowed(method: str, path: str, allowed: str) -> Reply:
        return Reply(405, error_body(f"{method} is not allowed on {path}; use {allowed}"), allow=allowed)

    async def infer(self, name: str, version: str | None, headers: Any, body: bytes) -> Reply:
        """``POST /v2/models/{name}[/versions/{version}]/infer``."""
        start = time.perf_counter_ns()
        mv = self.manager.get(name, version)  # no await from here to the batcher: a retired version gets nothing new
        stats = mv.stats
        try:
            encoding = headers.get("content-encoding")
            if encoding is not None:
                body = decompress(body, encoding, self.max_body)
            req = parse_infer_request(body, headers.get("inference-header-content-length"), mv.signature)
            key = tuple(a.shape[1:] for a in req.inputs.values()) if mv.signature.variable else ()
            arrays, timing = await mv.batcher.infer(req.inputs, req.rows, req.outputs, key)
            out_start = time.perf_counter_ns()
            datatypes = mv.datatypes
            payload, json_length = encode_infer_response(
                mv.name, mv.version_str, req.id, req.outputs, arrays, [datatypes[n] for n in req.outputs], req.binary
            )
        except InferenceError as err:
            stats.failure += 1
            return _error(str(err), err.status)
        except BatcherClosed:
            stats.failure += 1
            return _error(f"model {mv.name!r} version {mv.version} was unloaded while the request waited; retry", 503)
        end = time.perf_counter_ns()
        stats.success += 1
        stats.count += req.rows
        stats.queue_ns += timing[0]
        stats.compute_input_ns += timing[1]
        stats.compute_infer_ns += timing[2]
        stats.compute_output_ns += end - out_start
        stats.request_ns += end - start
        if json_length is None:
            return Reply(200, payload)
        return Reply(200, payload, _BINARY, json_length)


def _json_params(body: bytes, what: str) -> dict[str, Any]:
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError as err:
        raise InferenceError(f"malformed JSON in the {what} request: {err}") from None
    if not isinstance(params, dict):
        raise InferenceError(f"the {what} request must be a JSON object, got {type(params).__name__}")
    return params


# ---------------------------------------------------------------------------------------- built-in HTTP/1.1


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_MAX_HEAD = 64 * 1024


_LINGER_S = 5.0


class _BadRequest(Exception):
    """A request refused at the HTTP level; ``remaining``: body bytes still to come, ``None`` if unknown."""

    def __init__(self, status: int, message: str, remaining: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.remaining = remaining


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection (RFC 9112): persistent by default, pipelined requests answered in order,
    ``Content-Length`` or ``chunked`` bodies, ``Expect: 100-continue``.

    Why not aiohttp here: with ``tritonclient`` at concurrency 1 on a busy 2-core machine, the same
    :class:`InferenceService` behind aiohttp's low-level server used ~236 us of server CPU per inference
    (its ``web.Application`` ~40 us more) and ~173 us behind this protocol; the round trip fell from ~400 to
    ~330 us. aiohttp on Python 3.11 also spends two extra event-loop iterations per request. A request is
    parsed in ``data_received`` and handled in one task; at most one per connection at a time, as HTTP/1.1
    answers in order anyway.
    """

    def __init__(self, frontend: BuiltinHttpServer) -> None:
        self.frontend = frontend
        self.service = frontend.service
        self.max_body = frontend.service.max_body
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scan = 0  # where to resume looking for the end of the request head
        self.head: tuple[str, str, dict[str, str], bool] | None = None  # method, path, headers, keep-alive
        self.length = 0  # Content-Length of the pending body, -1 for chunked
        self.busy = False  # a request is being handled
        self.continued = False  # 100 Continue sent for the pending request
        self.reading = True
        self.writable: asyncio.Future[None] | None = None
        self.last_active = 0.0
        self.eof = False  # the client closed its side
        self.linger = 0  # after refusing a request: body bytes still to discard (-1: unknown, until EOF or timeout)

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.frontend.connections.add(self)
        self.last_active = self.frontend.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.frontend.connections.discard(self)
        self.transport = None
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.frontend.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.linger:  # a refused request's body: discard it
            if self.linger > 0:
                self.linger = max(self.linger - len(data), 0)
                if self.linger == 0 and self.transport is not None:
                    self.transport.close()
            return
        self.buffer += data
        self.last_active = self.frontend.loop.time()
        if not self.busy:
            self._next()
        elif len(self.buffer) > self.max_body + _MAX_HEAD and self.reading and self.transport is not None:
            self.transport.pause_reading()  # pipelined bytes pile up behind a running request
            self.reading = False

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy and not self.linger  # half-open until the running request is answered, then close

    @property
    def idle(self) -> bool:
        """No request running and none partly received (a refused body being discarded does not count)."""
        return not self.busy and (not self.buffer or self.linger != 0)

    # ---- parsing

    def _next(self) -> None:
        """Parse the next complete request in the buffer, if any, and start handling it."""
        try:
            request = self._parse()
        except _BadRequest as err:
            self._refuse(err)
            return
        if request is None:
            return
        method, path, headers, keep_alive, body = request
        self.busy = True
        self.frontend.loop.create_task(self._handle(method, path, headers, keep_alive, body))

    def _refuse(self, err: _BadRequest) -> None:
        """Answer an unusable request and close, lingering: a client still uploading the body it declared would
        get a connection reset instead of the answer if the socket closed with its bytes unread, so incoming
        bytes are discarded until the declared body is through (or ``_LINGER_S`` passed)."""
        transport = self.transport
        if transport is None:
            return
        self._send(Reply(err.status, error_body(str(err))), keep_alive=False, head_only=False, close=False)
        self.linger = err.remaining if err.remaining is not None else -1  # data_received now discards
        self.buffer.clear()
        if self.linger == 0:
            transport.close()
        else:
            self.frontend.loop.call_later(_LINGER_S, transport.close)

    def _parse(self) -> tuple[str, str, dict[str, str], bool, bytes] | None:
        buf = self.buffer
        if self.head is None:
            while buf[:2] == b"\r\n":  # empty lines before a request line are ignored (RFC 9112, 2.2)
                del buf[:2]
            end = buf.find(b"\r\n\r\n", self.scan)
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _BadRequest(431, f"request head larger than {_MAX_HEAD} bytes")
                self.scan = max(len(buf) - 3, 0)
                return None
            if end > _MAX_HEAD:
                raise _BadRequest(431, f"request head larger than {_MAX_HEAD} bytes")
            try:
                self.head, self.length = self._parse_head(bytes(buf[:end]))
            except _BadRequest as err:
                if err.remaining is not None:  # part of the refused body may have arrived already
                    err.remaining = max(err.remaining - (len(buf) - end - 4), 0)
                raise
            del buf[: end + 4]
            self.scan = 0
            self.continued = False
        method, path, headers, keep_alive = self.head
        if self.length >= 0:
            if len(buf) < self.length:
                self._maybe_continue(headers)
                return None
            with memoryview(buf) as view:
                body = bytes(view[: self.length])  # one copy (a bytearray slice would add another)
            del buf[: self.length]
        else:
            decoded = self._dechunk()
            if decoded is None:
                self._maybe_continue(headers)
                return None
            body = decoded
        self.head = None
        return method, path, headers, keep_alive, body

    def _parse_head(self, raw: bytes) -> tuple[tuple[str, str, dict[str, str], bool], int]:
        lines = raw.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1.") or not request_line[0].isalpha():
            raise _BadRequest(400, f"malformed HTTP request line {lines[0][:100]!r}")
        method, target, version = request_line
        if not target.startswith("/"):
            raise _BadRequest(400, f"request target must be a path starting with '/', got {target[:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, f"malformed HTTP header line {line[:100]!r}")
            name = name.lower()
            value = value.strip()
            if name in headers and name in ("content-length", "transfer-encoding", "host"):
                if headers[name] != value:
                    raise _BadRequest(400, f"conflicting {name} headers")
            headers[name] = value
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        path = target.split("?", 1)[0]
        if "%" in path:
            path = unquote(path)
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise _BadRequest(501, f"Transfer-Encoding {te!r} is not supported; use chunked or Content-Length")
            if "content-length" in headers:
                raise _BadRequest(400, "a request may not have both Transfer-Encoding and Content-Length")
            length = -1
            self.chunks: list[bytes] = []
            self.chunked_size = 0
        else:
            raw_length = headers.get("content-length", "0")
            if not raw_length.isdigit():
                raise _BadRequest(400, f"Content-Length must be a non-negative integer, got {raw_length[:50]!r}")
            length = int(raw_length)
            if length > self.max_body:
                raise _BadRequest(
                    413,
                    f"request body of {length} bytes is larger than the limit of {self.max_body} bytes "
                    "(--max-body-size)",
                    length,
                )
        return (method.upper(), path, headers, keep_alive), length

    def _dechunk(self) -> bytes | None:
        """Consume complete chunks from the buffer; the body once the last chunk (and trailers) arrived."""
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > 1024:
                    raise _BadRequest(400, "malformed chunk size line")
                return None
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, f"malformed chunk size {size_text[:20]!r}") from None
            if size == 0:
                end = buf.find(b"\r\n\r\n", line_end)  # trailers end with an empty line
                if end < 0 and buf[line_end : line_end + 4] != b"\r\n\r\n":
                    if len(buf) > _MAX_HEAD:
                        raise _BadRequest(431, "chunked trailers too large")
                    return None
                del buf[: (end if end >= 0 else line_end) + 4]
                body = b"".join(self.chunks)
                self.chunks = []
                return body
            self.chunked_size += size
            if self.chunked_size > self.max_body:
                raise _BadRequest(413, f"request body larger than the limit of {self.max_body} bytes (--max-body-size)")
            start = line_end + 2
            if len(buf) < start + size + 2:
                return None
            if buf[start + size : start + size + 2] != b"\r\n":
                raise _BadRequest(400, "chunk data not followed by CRLF")
            self.chunks.append(bytes(buf[start : start + size]))
            del buf[: start + size + 2]

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if not self.continued and headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.continued = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # ---- handling

    async def _handle(self, method: str, path: str, headers: dict[str, str], keep_alive: bool, body: bytes) -> None:
        try:
            reply = await self.service.handle("GET" if method == "HEAD" else method, path, headers, body)
        except asyncio.CancelledError:  # the event loop is going away
            self._send(_error("server shutting down", 503), keep_alive=False, head_only=False)
            raise
        except Exception as err:  # service.handle answers its own errors; this is a bug: answer and close
            log.exception("unhandled error in %s %s", method, path)
            reply = _error(f"internal server error: {type(err).__name__}: {err}", 500)
            keep_alive = False
        keep_alive = keep_alive and not self.frontend.stopping and not self.eof
        self._send(reply, keep_alive, head_only=method == "HEAD")
        if self.writable is not None and not self.writable.done():
            await self.writable  # the client is not reading: wait before taking its next request
        self.busy = False
        if not keep_alive or self.transport is None:
            return
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
        if self.buffer:
            self._next()

    def _send(self, reply: Reply, keep_alive: bool, head_only: bool, close: bool = True) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = reply.body
        head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\nContent-Length: {len(body)}\r\n"]
        if reply.content_type is not None:
            head.append(f"Content-Type: {reply.content_type}\r\n")
        if reply.header_length is not None:
            head.append(f"Inference-Header-Content-Length: {reply.header_length}\r\n")
        if reply.allow is not None:
            head.append(f"Allow: {reply.allow}\r\n")
        head.append(self.frontend.date_header())
        head.append("\r\n" if keep_alive else "Connection: close\r\n\r\n")
        data = "".join(head).encode("latin-1")
        if head_only:
            transport.write(data)
        elif len(body) < 65536:
            transport.write(data + body)
        else:
            transport.write(data)
            transport.write(body)
        if not keep_alive and close:
            transport.close()


class BuiltinHttpServer:
    """Listens with :class:`HttpConnection`; :meth:`stop` lets every started request finish."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date = ("", -1)

    def date_header(self) -> str:
        now = int(time.time())
        if self._date[1] != now:
            self._date = (f"Date: {formatdate(now, usegmt=True)}\r\nServer: {SERVER_NAME}\r\n", now)
        return self._date[0]

    async def start(self) -> int:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), self.options.host, self.options.port, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.create_task(self._sweep_idle())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep_idle(self) -> None:
        """Close keep-alive connections idle for ``keepalive_timeout_s`` (one timer for all connections
        instead of one per request)."""
        timeout = self.options.keepalive_timeout_s
        while True:
            await asyncio.sleep(min(timeout, 5.0))
            cutoff = self.loop.time() - timeout
            for conn in list(self.connections):
                if not conn.busy and conn.last_active < cutoff and conn.transport is not None:
                    conn.transport.close()

    async def stop(self, timeout: float) -> None:
        """Stop listening, close idle connections, let started requests finish (answered with
        ``Connection: close``), then close whatever is left after ``timeout`` seconds."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle and conn.transport is not None:
                    conn.transport.close()
            if not self.connections or self.loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("closing a connection with a request still running after %.1f s", timeout)
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


# ------------------------------------------------------------------------------------------ aiohttp front end


class AiohttpServer:
    """The same service on aiohttp's low-level server (``--http-server aiohttp``): slower per request (see
    :class:`HttpConnection`), kept for deployments that prefer aiohttp's HTTP implementation."""

    def __init__(self, service: InferenceService, options: ServerOptions) -> None:
        self.service = service
        self.options = options
        self.stopping = False
        self.in_flight = 0  # handlers running, body upload included
        self._runner: Any = None

    async def _handle(self, request: Any) -> Any:
        self.in_flight += 1
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: Any) -> Any:
        from aiohttp import web

        length = request.content_length
        refused = length is not None and length > self.service.max_body
        if refused:
            reply = _error(
                f"request body of {length} bytes is larger than the limit of {self.service.max_body} bytes "
                "(--max-body-size)",
                413,
            )
        else:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                refused = True
                reply = _error(
                    f"request body larger than the limit of {self.service.max_body} bytes (--max-body-size)", 413
                )
            else:
                reply = await self.service.handle(request.method, request.path, request.headers, body)
        headers = {}
        if reply.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(reply.header_length)
        if reply.allow is not None:
            headers["Allow"] = reply.allow
        if reply.content_type is not None:
            headers["Content-Type"] = reply.content_type
        response = web.Response(status=reply.status, body=bytes(reply.body), headers=headers)
        if self.stopping or refused:  # a refused body is not read: close rather than wait for it
            response.force_close()
        return response

    async def start(self) -> int:
        from aiohttp import web

        max_body = self.service.max_body

        def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> Any:
            loop = asyncio.get_running_loop()
            return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

        # lingering_time: how long aiohttp drains a body the handler did not read (a refused one) before closing
        server = web.Server(self._handle, request_factory=request_factory, access_log=None, lingering_time=_LINGER_S)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self.options.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port, reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self, timeout: float) -> None:
        """aiohttp's own shutdown ignores bytes that arrive once it started, so a request whose body is still
        uploading would hang: first stop listening and wait for running handlers, then clean up."""
        self.stopping = True
        for site in list(self._runner.sites):
            await site.stop()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._runner.cleanup()


# ------------------------------------------------------------------------------------------------ the server


class Server:
    """A running server: :meth:`start` loads the repository and opens the socket, :meth:`stop` shuts down
    gracefully. Use it from an event loop (``main`` runs one; tests may run it in a thread)."""

    def __init__(self, options: ServerOptions) -> None:
        if options.http_server not in ("builtin", "aiohttp"):
            raise ValueError(f"http_server must be 'builtin' or 'aiohttp', got {options.http_server!r}")
        self.options = options
        self.metrics = MetricsRegistry()
        self.manager = ModelManager(options, self.metrics)
        self.service = InferenceService(self.manager, options)
        self.frontend: BuiltinHttpServer | AiohttpServer | None = None
        self.port: int | None = None

    async def start(self) -> None:
        await self.manager.start()
        if self.options.http_server == "aiohttp":
            self.frontend = AiohttpServer(self.service, self.options)
        else:
            self.frontend = BuiltinHttpServer(self.service, self.options)
        self.port = await self.frontend.start()
        log.info("serving %s on http://%s:%d", self.options.model_repository, self.options.host, self.port)

    async def stop(self) -> None:
        """Refuse new connections, finish in-flight requests, then drain and release every model."""
        self.service.stopping = True
        if self.frontend is not None:
            await self.frontend.stop(self.options.shutdown_timeout_s)
            self.frontend = None
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
