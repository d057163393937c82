"""ONNX Runtime sessions for one model version: which execution providers (:func:`choose_providers`), the
session and its thread settings (:func:`create_session`), the check of ``model.onnx`` against ``config.pbtxt``
(:func:`check_model_io`), warm-up (:func:`warm_up`), and ``session.run`` wrapped as a
:class:`~serving.batching.DynamicBatcher` runner (:func:`make_runner`). :mod:`serving.models` calls these to load
a version; nothing here knows about HTTP or the repository's polling.

Thread settings: ``--intra-op-threads`` / ``--inter-op-threads`` (:class:`~serving.options.ServerOptions`,
default 1: batch-invariant results and no oversubscription when several instances run at once), overridden per
model by the ``config.pbtxt`` parameters Triton's onnxruntime backend reads, ``intra_op_thread_count``,
``inter_op_thread_count`` and ``execution_mode`` (0 sequential, 1 parallel). Execution providers: TensorRT then
CUDA when onnxruntime-gpu sees a GPU and ``instance_group.kind`` is not ``KIND_CPU``, else CPU; the parameter
``execution_providers`` (comma separated) overrides the list.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from serving.batching import Runner
from serving.options import ServerOptions
from serving.protocol import InferenceError
from serving.repository import ConfigError, ModelConfig

log = logging.getLogger("mtlib.serve")

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
