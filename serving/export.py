"""Export view -> ONNX -> a Triton-layout model repository, with a torch vs ONNX Runtime parity check.

Serving knows one thing about a model: its **export view** (docs/architecture.md, "Contracts between the packages").
An export view is a plain :class:`torch.nn.Module` with

* ``forward(**inputs)``: named dense tensors, each with a leading batch axis, in; named per-task tensors
  out, as a ``dict`` (keys = output names) or a tuple in the order of ``output_specs``;
* ``input_specs`` and ``output_specs``: sequences of :class:`TensorSpec` (name, dtype, per-example shape;
  for inputs also the range valid random values are drawn from, which the parity check feeds);
* optionally ``reference(**inputs)``: the computation the export must reproduce when ``forward`` is a
  rewrite of it (e.g. the original model on its native input type). The parity check compares ONNX
  Runtime against ``reference`` when there is one, else against ``forward``.

Recommendation models (:class:`mtrec.export.RecExportView`) and RL policies use the same functions, so
nothing here knows about tasks, embeddings or observations.

What this module does:

* :func:`export_onnx`: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``; the legacy TorchScript
  exporter silently mis-exports some scatter ops: docs/architecture.md, "Dependency facts") with one dynamic
  batch axis shared by every input and output, named inputs and outputs, weights inline in one ``model.onnx`` (Triton's
  ``onnxruntime_onnx`` platform loads a single file; protobuf caps it at 2 GB). ``fp16=True`` exports a
  half-precision variant whose inputs and outputs keep their declared (FP32) types: the casts are inside
  the graph, so clients do not change. ONNX Runtime's CPU provider runs such a graph, but it has no FP16
  kernels for most of the ops a recommendation model uses (``Gemm``, ``ReduceSum``, ``Mul``, ``Div``,
  ``Sigmoid``, ...): at session creation its ``InsertCastTransformer`` wraps them in casts
  (``InsertedPrecisionFreeCast_*`` nodes) and runs them in FP32 on FP16-rounded weights and activations.
  The numbers are those of FP16 storage (see :class:`ParityOptions` for the tolerance) and CPU latency
  is about that of FP32 (measured 5-15% slower); the file is half the size, and the speed-up belongs to
  the CUDA and TensorRT providers, which have FP16 kernels.
* :func:`check_parity`: torch vs ONNX Runtime (CPU) on seeded random inputs at several batch sizes;
  passes when ``|ort - torch| <= atol + rtol * |torch|`` everywhere (``numpy.allclose``'s rule).
* :func:`export_to_repository`: export, parity check, then one new version in the repository:
  ``REPO/NAME/config.pbtxt`` (via :func:`serving.repository.write_config`, checked to round-trip through
  :func:`serving.repository.read_config`), ``REPO/NAME/VERSION/model.onnx``, ``REPO/NAME/VERSION/export.json``
  (source, library versions, opset, parity per batch size) and any metadata files the caller passes
  (written both next to ``config.pbtxt`` and into the version directory). The version is built in a
  hidden temporary directory and renamed into place only after the parity check passed, so a failed
  export leaves nothing a server would load, and a polling server never sees a half-written version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from serving.repository import CONFIG_FILE, MODEL_FILE, ModelConfig, TensorConfig, read_config, write_config

__all__ = [
    "EXPORT_INFO_FILE",
    "ExportError",
    "ExportResult",
    "ExportView",
    "ParityError",
    "ParityOptions",
    "ParityReport",
    "ServingOptions",
    "TensorSpec",
    "check_parity",
    "check_view",
    "export_onnx",
    "export_to_repository",
    "model_config",
    "random_inputs",
    "run_view",
]

log = logging.getLogger("serving.export")

EXPORT_INFO_FILE = "export.json"

#: torch dtype -> Open Inference Protocol (KServe v2) datatype, as :mod:`serving.repository` spells it.
TORCH_TO_V2: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
# ONNX TensorProto element types of the same (onnx.TensorProto.FLOAT = 1, ...), to check the exported graph.
_ONNX_ELEM_TYPE: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.uint8: 2,
    torch.int8: 3,
    torch.int16: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.bool: 9,
    torch.float16: 10,
    torch.float64: 11,
}
# Characters config.pbtxt (written unescaped by serving.repository) and HTTP clients cope with in a name.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class ExportError(RuntimeError):
    """The view cannot be exported as asked (bad specs, a graph that lost its batch axis, a repository
    conflict); the message says what and where."""


class ExportRequestError(ExportError, ValueError):
    """What the caller asked for cannot be done: a bad model name, version or metadata file name, a repository
    path that is a file, a version that exists already. A user mistake (a ``ValueError`` too), which the command
    lines report in one line with exit status 2."""


class ParityError(ExportError):
    """ONNX Runtime's outputs differ from torch's beyond the tolerance; ``report`` holds the numbers."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of an export view.

    Attributes:
        name: the ONNX (and served) tensor name.
        dtype: torch dtype (``float32``, ``int64``, ...).
        shape: the per-example shape: the batch axis is left out (``(D,)`` for a ``[B, D]`` tensor).
        low: inputs only, the smallest valid value (integers: inclusive).
        high: inputs only, integers: the exclusive upper bound of valid values (required for integer
            inputs, e.g. an embedding table's size); floats: with ``low`` set, values are drawn uniformly
            from ``[low, high)``, otherwise from a standard normal.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"tensor name {self.name!r}: use letters, digits and _ . : / - (starting with a letter, digit or _)"
            )
        if self.dtype not in TORCH_TO_V2:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype} not servable; one of {list(TORCH_TO_V2)}")
        shape = tuple(int(d) for d in self.shape)
        if any(d <= 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: per-example shape must be positive sizes, got {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol datatype (``FP32``, ``INT64``, ...)."""
        return TORCH_TO_V2[self.dtype]

    def tensor_config(self) -> TensorConfig:
        """This tensor as a ``config.pbtxt`` entry (dims without the batch axis)."""
        return TensorConfig(self.name, self.datatype, self.shape)

    def random(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """A valid random ``[batch_size, *shape]`` tensor (what the parity check feeds)."""
        size = (batch_size, *self.shape)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, size, generator=generator).bool()
        if self.dtype.is_floating_point:
            if self.low is not None and self.high is not None:
                return (torch.rand(size, generator=generator) * (self.high - self.low) + self.low).to(self.dtype)
            return torch.randn(size, generator=generator).to(self.dtype)
        if self.high is None:
            raise ValueError(f"input {self.name!r}: integer inputs need `high` (exclusive bound of valid values)")
        low = int(self.low) if self.low is not None else 0
        if int(self.high) <= low:
            raise ValueError(f"input {self.name!r}: empty value range [{low}, {int(self.high)})")
        return torch.randint(low, int(self.high), size, generator=generator, dtype=self.dtype)


@runtime_checkable
class ExportView(Protocol):
    """What serving needs of a model (see the module docstring); an ``nn.Module`` that also has these."""

    input_specs: Sequence[TensorSpec]
    output_specs: Sequence[TensorSpec]

    def __call__(self, **inputs: Tensor) -> Mapping[str, Tensor] | Sequence[Tensor]: ...


def check_view(view: Any) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``view`` meets the export-view contract."""
    if not isinstance(view, nn.Module):
        raise TypeError(f"an export view must be an nn.Module, got {type(view).__name__}")
    for attr in ("input_specs", "output_specs"):
        specs = getattr(view, attr, None)
        if not specs or not all(isinstance(s, TensorSpec) for s in specs):
            raise TypeError(f"{type(view).__name__}.{attr} must be a non-empty sequence of TensorSpec, got {specs!r}")
    names = [s.name for s in (*view.input_specs, *view.output_specs)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{type(view).__name__}: tensor names must be unique across inputs and outputs: {dupes}")
    for s in view.input_specs:
        if not (s.dtype.is_floating_point or s.dtype == torch.bool) and s.high is None:
            raise ValueError(f"input {s.name!r} ({s.dtype}): integer inputs need `high`, the bound of valid values")


def random_inputs(specs: Sequence[TensorSpec], batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random valid inputs ``{name: [batch_size, *shape]}`` in spec order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return {s.name: s.random(batch_size, g) for s in specs}


def _ordered_outputs(view: nn.Module, out: Any, where: str) -> tuple[Tensor, ...]:
    names = [s.name for s in view.output_specs]
    if isinstance(out, Mapping):
        missing = [n for n in names if n not in out]
        extra = [k for k in out if k not in names]
        if missing or extra:
            raise ExportError(f"{where} returned outputs {list(out)}; output_specs declare {names}")
        return tuple(out[n] for n in names)
    if isinstance(out, Tensor):
        out = (out,)
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise ExportError(f"{where} must return a dict or a tuple of {len(names)} tensors ({names}), got {type(out)}")
    return tuple(out)


def run_view(view: nn.Module, inputs: Mapping[str, Tensor], *, reference: bool = False) -> dict[str, Tensor]:
    """Run the view (or its ``reference`` when asked and present) without gradients.

    Returns ``{output name: tensor}`` in ``output_specs`` order, after checking each output's shape
    (``[B, *shape]``) and dtype against its spec.
    """
    fn = getattr(view, "reference", None) if reference else None
    where = f"{type(view).__name__}.{'reference' if fn is not None else 'forward'}"
    with torch.no_grad():
        out = _ordered_outputs(view, (fn or view)(**inputs), where)
    batch = next(iter(inputs.values())).shape[0]
    result: dict[str, Tensor] = {}
    for spec, t in zip(view.output_specs, out):
        if tuple(t.shape) != (batch, *spec.shape) or t.dtype != spec.dtype:
            raise ExportError(
                f"{where}: output {spec.name!r} is {t.dtype} {tuple(t.shape)}, "
                f"its spec says {spec.dtype} {(batch, *spec.shape)}"
            )
        result[spec.name] = t
    return result


# ------------------------------------------------------------------------------------------------- ONNX


class _Positional(nn.Module):
    """Adapts a view to what the exporter traces: positional inputs in ``input_specs`` order, a tuple of
    outputs in ``output_specs`` order; with ``compute_dtype`` floating inputs are cast to it on the way in
    and outputs back to their declared dtypes on the way out (the half-precision variant)."""

    def __init__(self, view: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.view = view
        self.input_specs = tuple(view.input_specs)
        self.output_specs = tuple(view.output_specs)
        self.compute_dtype = compute_dtype

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        inputs = {}
        for spec, x in zip(self.input_specs, args):
            if self.compute_dtype is not None and spec.dtype.is_floating_point:
                x = x.to(self.compute_dtype)
            inputs[spec.name] = x
        out = _ordered_outputs(self.view, self.view(**inputs), type(self.view).__name__)
        return tuple(t.to(s.dtype) for s, t in zip(self.output_specs, out))


def _example_batch_size(specs: Sequence[TensorSpec]) -> int:
    # torch.export specialises sizes 0 and 1 and may tie equal sizes together, so the traced batch size
    # must differ from every per-example dimension.
    taken = {d for s in specs for d in s.shape}
    b = 3
    while b in taken:
        b += 1
    return b


def export_onnx(view: nn.Module, path: str | Path, *, fp16: bool = False, opset: int | None = None) -> Path:
    """Export ``view`` to one self-contained ONNX file at ``path`` and check the graph's signature.

    Inputs and outputs are named after the specs and share one symbolic batch axis (dimension 0); the
    other dimensions are fixed to the specs' shapes. ``fp16=True`` converts a copy of the view to
    half precision (``nn.Module.half``) and casts floating inputs to FP16 and outputs back to their
    declared dtypes inside the graph. ``opset``: the ONNX opset (``None``: the exporter's default).

    Raises:
        ExportError: the exporter failed, or the graph's inputs/outputs do not match the specs (a name,
            an element type, or a batch axis that tracing made static).
    """
    check_view(view)
    path = Path(path)
    module: nn.Module = view
    if fp16:
        module = copy.deepcopy(view).half()
    wrapper = _Positional(module, torch.float16 if fp16 else None).eval()
    specs = tuple(view.input_specs)
    example = tuple(random_inputs(specs, _example_batch_size(specs), seed=0).values())
    batch = torch.export.Dim("batch", min=1)
    # forward(*args) binds every input to the one parameter `args`: its shapes are one nested tuple.
    dynamic_shapes = (tuple({0: batch} for _ in specs),)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The exporter's notices (axis renames, its own deprecations, some raised from copyreg) say
            # nothing about this export's correctness, which the parity check establishes.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                example,
                dynamo=True,
                input_names=[s.name for s in specs],
                output_names=[s.name for s in view.output_specs],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; name the view and keep the cause
        raise ExportError(f"torch.onnx.export (dynamo) failed for {type(view).__name__}: {err}") from err
    assert program is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    _check_graph(view, path)
    return path


def _check_graph(view: nn.Module, path: Path) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for where, declared, actual in (
        ("input", view.input_specs, graph.input),
        ("output", view.output_specs, graph.output),
    ):
        got = [v.name for v in actual]
        want = [s.name for s in declared]
        if got != want:
            raise ExportError(f"{path}: graph {where}s are {got}, the view declares {want}")
        for spec, value in zip(declared, actual):
            t = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            if t.elem_type != _ONNX_ELEM_TYPE[spec.dtype]:
                raise ExportError(
                    f"{path}: {where} {spec.name!r} has ONNX element type {t.elem_type}, "
                    f"expected {_ONNX_ELEM_TYPE[spec.dtype]} ({spec.datatype})"
                )
            if not dims or not isinstance(dims[0], str) or [int(d) for d in dims[1:]] != list(spec.shape):
                raise ExportError(
                    f"{path}: {where} {spec.name!r} has shape {dims}, expected ['batch', *{list(spec.shape)}] "
                    "with a symbolic batch axis (did tracing specialise the batch size?)"
                )


def _onnx_summary(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "nodes": sum(ops.values()), "ops": dict(sorted(ops.items()))}


# ----------------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class ParityOptions:
    """How the parity check runs.

    Attributes:
        batch_sizes: the batch sizes compared.
        atol: absolute tolerance of an FP32 export (the check: ``|ort - torch| <= atol + rtol * |torch|``).
        rtol: relative tolerance of an FP32 export.
        fp16_atol: absolute tolerance of a half-precision export, against the FP32 torch reference.
        fp16_rtol: relative tolerance of a half-precision export. FP16 keeps 11 significant bits (unit
            roundoff 4.9e-4); a few layers of dot products and sums of embeddings amplify that a few
            times, so ``2e-3 + 1e-2 * |reference|`` leaves room for rounding but not for a wrong graph.
        seed: seed of the random inputs.
        threads: ONNX Runtime intra-op threads.
    """

    batch_sizes: tuple[int, ...] = (1, 64, 1024)
    atol: float = 1e-5
    rtol: float = 0.0
    fp16_atol: float = 2e-3
    fp16_rtol: float = 1e-2
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        sizes = tuple(int(b) for b in self.batch_sizes)
        if not sizes or any(b < 1 for b in sizes):
            raise ValueError(f"parity batch_sizes must be positive ints, got {list(self.batch_sizes)}")
        object.__setattr__(self, "batch_sizes", sizes)
        for key in ("atol", "rtol", "fp16_atol", "fp16_rtol"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"parity {key} must be >= 0, got {getattr(self, key)}")
        if self.threads < 0:
            raise ValueError(f"parity threads must be >= 0 (0: ONNX Runtime's default), got {self.threads}")

    def tolerance(self, fp16: bool) -> tuple[float, float]:
        """``(atol, rtol)`` for an FP32 or a half-precision export."""
        return (self.fp16_atol, self.fp16_rtol) if fp16 else (self.atol, self.rtol)


@dataclass
class ParityReport:
    """Result of :func:`check_parity`.

    ``max_abs_diff[batch][output]``: the largest ``|ort - torch|``; ``worst_ratio[batch][output]``: the
    largest ``|ort - torch| / (atol + rtol * |torch|)`` (the check passes when every ratio is <= 1).
    """

    atol: float
    rtol: float
    precision: str
    reference: str
    max_abs_diff: dict[int, dict[str, float]] = field(default_factory=dict)
    worst_ratio: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r <= 1.0 for per in self.worst_ratio.values() for r in per.values())

    def max_diff(self, batch_size: int) -> float:
        return max(self.max_abs_diff[batch_size].values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the ``parity`` entry of ``export.json``)."""
        return {
            "passed": self.passed,
            "precision": self.precision,
            "reference": self.reference,
            "rule": "|onnxruntime - torch| <= atol + rtol * |torch|",
            "atol": self.atol,
            "rtol": self.rtol,
            "batch_sizes": {
                str(b): {"max_abs_diff": self.max_diff(b), "per_output": self.max_abs_diff[b]}
                for b in self.max_abs_diff
            },
        }

    def summary(self) -> str:
        """A short table: one line per batch size."""
        tol = f"atol {self.atol:g}" + (f" + rtol {self.rtol:g} * |torch|" if self.rtol else "")
        lines = [f"parity ({self.precision}, ONNX Runtime vs torch {self.reference}, {tol}):"]
        for b in self.max_abs_diff:
            ok = "ok" if all(r <= 1.0 for r in self.worst_ratio[b].values()) else "FAILED"
            lines.append(f"  batch {b:>5}: max |diff| {self.max_diff(b):.3e}  {ok}")
        return "\n".join(lines)


def ort_session(path: str | Path, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session (``threads`` intra-op threads; 0 = ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    view: nn.Module,
    onnx_path: str | Path,
    options: ParityOptions = ParityOptions(),
    *,
    fp16: bool = False,
) -> ParityReport:
    """Compare ONNX Runtime's outputs of ``onnx_path`` with the view's torch outputs.

    The torch side is ``view.reference`` when the view has one (the original computation), else
    ``view.forward``, always in the view's own (FP32) precision, also for a half-precision export.
    Inputs: :func:`random_inputs` seeded with ``options.seed + batch_size``. Does not raise on a
    mismatch: see :attr:`ParityReport.passed`.
    """
    atol, rtol = options.tolerance(fp16)
    reference = "reference" if callable(getattr(view, "reference", None)) else "forward"
    report = ParityReport(atol=atol, rtol=rtol, precision="fp16" if fp16 else "fp32", reference=reference)
    session = ort_session(onnx_path, options.threads)
    names = [o.name for o in session.get_outputs()]
    for b in options.batch_sizes:
        inputs = random_inputs(view.input_specs, b, seed=options.seed + b)
        expected = run_view(view, inputs, reference=True)
        got = dict(zip(names, session.run(names, {k: v.numpy() for k, v in inputs.items()})))
        report.max_abs_diff[b], report.worst_ratio[b] = {}, {}
        for name, want in expected.items():
            w = want.double().numpy()
            g = np.asarray(got[name], dtype=np.float64)
            if g.shape != w.shape:
                raise ExportError(
                    f"{onnx_path}: output {name!r} has shape {g.shape} at batch {b}, torch gives {w.shape}"
                )
            diff = np.abs(g - w)
            diff[np.isnan(g) & np.isnan(w)] = 0.0
            diff[np.isnan(diff)] = np.inf
            tol = atol + rtol * np.abs(w)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(diff == 0, 0.0, diff / tol)  # tol 0 and diff > 0: inf, a failure
            report.max_abs_diff[b][name] = float(diff.max(initial=0.0))
            report.worst_ratio[b][name] = float(ratio.max(initial=0.0))
    return report


# ------------------------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class ServingOptions:
    """The serving settings written into ``config.pbtxt`` (Triton's ``model_config.proto`` names).

    Attributes:
        max_batch_size: the largest batch the server forms (Triton ``max_batch_size``).
        max_queue_delay_microseconds: how long the dynamic batcher may hold a request to batch it.
        preferred_batch_size: batch sizes the batcher aims for (empty: none).
        instance_count: model instances (sessions) run in parallel.
        instance_kind: ``KIND_CPU``, ``KIND_GPU`` or ``KIND_AUTO``.
    """

    max_batch_size: int = 1024
    max_queue_delay_microseconds: int = 100
    preferred_batch_size: tuple[int, ...] = ()
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (the batch axis is dynamic), got {self.max_batch_size}")
        if self.max_queue_delay_microseconds < 0:
            raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_microseconds}")
        preferred = tuple(int(b) for b in self.preferred_batch_size)
        if any(not 1 <= b <= self.max_batch_size for b in preferred):
            raise ValueError(f"preferred_batch_size {list(preferred)} must lie in [1, {self.max_batch_size}]")
        object.__setattr__(self, "preferred_batch_size", preferred)
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, got {self.instance_count}")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
            raise ValueError(f"instance_kind must be KIND_CPU, KIND_GPU or KIND_AUTO, got {self.instance_kind!r}")


def model_config(
    view: nn.Module, name: str, serving: ServingOptions = ServingOptions(), existing: ModelConfig | None = None
) -> ModelConfig:
    """The ``config.pbtxt`` of ``view`` served as ``name``.

    With ``existing`` (the model's current config) the version policy and ``parameters`` are kept, so a
    hand-edited policy survives a new export; its inputs and outputs must equal the view's, since every
    version of a model shares one config.

    Raises:
        ExportError: ``existing`` declares other inputs or outputs.
    """
    inputs = [s.tensor_config() for s in view.input_specs]
    outputs = [s.tensor_config() for s in view.output_specs]
    cfg = ModelConfig(
        name=name,
        inputs=inputs,
        outputs=outputs,
        platform="onnxruntime_onnx",
        max_batch_size=serving.max_batch_size,
        max_queue_delay_microseconds=serving.max_queue_delay_microseconds,
        preferred_batch_size=list(serving.preferred_batch_size),
        instance_count=serving.instance_count,
        instance_kind=serving.instance_kind,
    )
    if existing is not None:
        for what, old, new in (("inputs", existing.inputs, inputs), ("outputs", existing.outputs, outputs)):
            if list(old) != list(new):
                raise ExportError(
                    f"model {name!r} already serves {what} {_describe(old)}; this export has {_describe(new)}. "
                    "Every version of a model shares one config.pbtxt: export under a new model_name, or "
                    "remove the old model first"
                )
        cfg.version_policy = existing.version_policy
        cfg.latest_num_versions = existing.latest_num_versions
        cfg.specific_versions = list(existing.specific_versions)
        cfg.parameters = dict(existing.parameters)
    return cfg


def _describe(tensors: Sequence[TensorConfig]) -> str:
    return "[" + ", ".join(f"{t.name}:{t.datatype}{list(t.dims)}" for t in tensors) + "]"


@dataclass
class ExportResult:
    """What :func:`export_to_repository` wrote."""

    repository: Path
    name: str
    version: int
    version_dir: Path
    config: ModelConfig
    parity: ParityReport
    info: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.version_dir / MODEL_FILE


def _versions_present(model_dir: Path) -> list[int]:
    """Every numeric entry of a model directory (with or without a model file): the numbers taken."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def export_to_repository(
    view: nn.Module,
    repository: str | Path,
    name: str,
    *,
    version: int | None = None,
    fp16: bool = False,
    serving: ServingOptions = ServingOptions(),
    parity: ParityOptions = ParityOptions(),
    opset: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export ``view`` as a new version of model ``name`` in a Triton-layout ``repository``.

    Args:
        view: an export view (module docstring).
        repository: the repository root (created when missing).
        name: the model's name (its directory).
        version: the version number; ``None``: one more than the highest number present.
        fp16: export the half-precision variant (inputs and outputs keep their declared types) and
            check it with ``parity.fp16_atol`` / ``fp16_rtol``.
        serving: batching and instance settings of ``config.pbtxt``.
        parity: the parity check's batch sizes, tolerances and seed.
        opset: ONNX opset (``None``: the exporter's default).
        metadata: ``{file name: JSON value}`` written into the version directory (each version's own)
            and, when the new version is the highest, next to ``config.pbtxt`` (what the served latest
            version reads), e.g. ``features.json``.
        source: JSON-ready facts about where the model came from, recorded in ``export.json``.

    Returns:
        An :class:`ExportResult`; ``info`` is the content of ``export.json``.

    Raises:
        ParityError: ONNX Runtime and torch disagree beyond the tolerance (nothing is written).
        ExportRequestError: the version exists, a bad name or version, a repository path that is a file.
        ExportError: the model's config declares other inputs/outputs, or the export itself failed (nothing is
            written).
    """
    check_view(view)
    repository = Path(repository)
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name) or name.isdigit():
        raise ExportRequestError(f"model name {name!r}: use letters, digits and _ . - (not only digits, no '/')")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExportRequestError(f"version must be a positive int or None (next free), got {version!r}")
    metadata = dict(metadata or {})
    for file in metadata:
        if not file or "/" in file or file.startswith(".") or file in (CONFIG_FILE, MODEL_FILE, EXPORT_INFO_FILE):
            raise ExportRequestError(
                f"metadata file name {file!r} is not allowed (a plain name other than the model files)"
            )
    if repository.exists() and not repository.is_dir():
        raise ExportRequestError(f"repository {repository} exists and is not a directory")
    model_dir = repository / name
    existing = read_config(repository, name) if (model_dir / CONFIG_FILE).is_file() else None
    config = model_config(view, name, serving, existing)  # fails early on an input/output mismatch
    taken = _versions_present(model_dir)
    if version is None:
        version = (taken[-1] + 1) if taken else 1
    elif version in taken:
        raise ExportRequestError(
            f"version {version} of model {name!r} already exists ({model_dir / str(version)}); "
            f"choose another or leave version unset for the next free one ({taken[-1] + 1})"
        )

    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))  # same filesystem: atomic rename
    try:
        t0 = time.perf_counter()
        export_onnx(view, tmp / MODEL_FILE, fp16=fp16, opset=opset)
        export_seconds = time.perf_counter() - t0
        report = check_parity(view, tmp / MODEL_FILE, parity, fp16=fp16)
        log.debug("%s", report.summary())
        if not report.passed:
            worst = {b: report.max_diff(b) for b in report.max_abs_diff}
            raise ParityError(
                f"parity check failed for model {name!r} version {version}: max |onnxruntime - torch| per batch "
                f"size {worst} exceeds atol {report.atol:g} + rtol {report.rtol:g} * |torch|; nothing was written",
                report,
            )
        info: dict[str, Any] = {
            "model_name": name,
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": dict(source or {}),
            "precision": "fp16" if fp16 else "fp32",
            **_onnx_summary(tmp / MODEL_FILE),
            "exporter": "torch.onnx.export(dynamo=True)",
            "export_seconds": round(export_seconds, 3),
            "versions": _library_versions(),
            "inputs": [{"name": s.name, "datatype": s.datatype, "dims": list(s.shape)} for s in view.input_specs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "dims": list(s.shape)} for s in view.output_specs],
            "parity": report.to_dict(),
            "model_bytes": (tmp / MODEL_FILE).stat().st_size,
            "model_sha256": _sha256(tmp / MODEL_FILE),
            "serving": asdict(serving),
        }
        _write_json(info, tmp / EXPORT_INFO_FILE)
        for file, content in metadata.items():
            _write_json(content, tmp / file)
        final = model_dir / str(version)
        if final.exists():
            raise ExportError(f"{final} appeared while exporting (another export?); nothing was written")
        # Model-level files first, the version last: a server polling the repository sees the new version
        # only once it is complete, and then with the config it belongs to.
        write_config(repository, config)
        if read_config(repository, name) != config:
            raise ExportError(f"{model_dir / CONFIG_FILE} does not read back as written (serving.repository bug?)")
        if not taken or version > taken[-1]:
            for file, content in metadata.items():
                _write_json(content, model_dir / file)
        if final.exists():
            raise ExportError(f"{final} appeared while exporting (another export?); the version was not moved in")
        os.replace(tmp, final)
        os.chmod(final, 0o755)  # mkdtemp creates 0700; a server running as another user must read it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_model_dir and model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    log.debug("wrote %s (%s, %d bytes)", final / MODEL_FILE, info["precision"], info["model_bytes"])
    return ExportResult(repository, name, version, final, config, report, info)
