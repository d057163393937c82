"""A Triton-layout model repository: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/VERSION/model.onnx``.

The part of Triton's model configuration (protobuf text format, ``model_config.proto``) that mtlib writes
and serves: platform, ``max_batch_size``, inputs and outputs with data types and dims (batch axis left out,
``-1`` for a variable axis), ``dynamic_batching`` with ``max_queue_delay_microseconds``,
``instance_group``, ``version_policy`` and string ``parameters``. :func:`write_config` and
:func:`parse_config` are inverses; the parser reads the protobuf text format in general (messages, repeated
fields in ``[...]`` or by repetition, comments), so a ``config.pbtxt`` edited by hand or written by Triton
tooling loads too, and a syntax error names the file, line and column. :func:`check_repository` refuses a path
that is not a repository (a file, a model's or a version's directory) with a message that says what to give
instead; the server (:mod:`serving.models`) reads the repository with :func:`model_names`,
:func:`available_versions`, :func:`read_config` and :func:`served_versions`.

Layout::

    REPO/
      NAME/
        config.pbtxt
        features.json        # how raw feature values become model inputs (vocabularies, scaling)
        1/model.onnx
        2/model.onnx
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"

# Triton config data types <-> Open Inference Protocol (KServe v2) data types <-> numpy.
TRITON_TO_V2 = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
}
V2_TO_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class ConfigError(ValueError):
    """A ``config.pbtxt`` that cannot be read, with file, line and column."""


class RepositoryError(ValueError):
    """A path given as a model repository that is not one (:func:`check_repository`)."""


@dataclass(frozen=True)
class TensorConfig:
    """One input or output: ``datatype`` in Open Inference Protocol spelling (``FP32``, ``INT64``, ...) and
    ``dims`` without the batch axis (``-1``: variable)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}; one of {sorted(V2_TO_NUMPY)}")

    @property
    def numpy_dtype(self) -> Any:
        return V2_TO_NUMPY[self.datatype]


@dataclass
class ModelConfig:
    """The served subset of Triton's ``ModelConfig``."""

    name: str
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    platform: str = "onnxruntime_onnx"
    max_batch_size: int = 1024
    max_queue_delay_microseconds: int = 100
    preferred_batch_size: list[int] = field(default_factory=list)
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"  # KIND_CPU | KIND_GPU | KIND_AUTO
    version_policy: str = "latest"  # latest | all | specific
    latest_num_versions: int = 1
    specific_versions: list[int] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorConfig | None:
        return next((t for t in self.inputs if t.name == name), None)


# ----------------------------------------------------------------------------------------------------- writing


def _tensor_block(t: TensorConfig) -> str:
    triton_type = next(k for k, v in TRITON_TO_V2.items() if v == t.datatype)
    dims = ", ".join(str(d) for d in t.dims)
    return f'  {{\n    name: "{t.name}"\n    data_type: {triton_type}\n    dims: [ {dims} ]\n  }}'


def format_config(cfg: ModelConfig) -> str:
    """``config.pbtxt`` text for ``cfg`` (Triton's protobuf text format)."""
    lines = [
        f'name: "{cfg.name}"',
        f'platform: "{cfg.platform}"',
        f"max_batch_size: {cfg.max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t) for t in cfg.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t) for t in cfg.outputs) + "\n]",
    ]
    batching = [f"  max_queue_delay_microseconds: {cfg.max_queue_delay_microseconds}"]
    if cfg.preferred_batch_size:
        batching.insert(0, "  preferred_batch_size: [ " + ", ".join(map(str, cfg.preferred_batch_size)) + " ]")
    lines.append("dynamic_batching {\n" + "\n".join(batching) + "\n}")
    lines.append(f"instance_group [\n  {{\n    count: {cfg.instance_count}\n    kind: {cfg.instance_kind}\n  }}\n]")
    if cfg.version_policy == "all":
        lines.append("version_policy: { all: {} }")
    elif cfg.version_policy == "specific":
        lines.append(
            "version_policy: { specific: { versions: [ " + ", ".join(map(str, cfg.specific_versions)) + " ] } }"
        )
    else:
        lines.append(f"version_policy: {{ latest: {{ num_versions: {cfg.latest_num_versions} }} }}")
    for key, value in cfg.parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{_escape(value)}" }}\n}}')
    return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_config(repository: str | Path, cfg: ModelConfig) -> Path:
    """Write ``REPO/NAME/config.pbtxt`` (atomically: a temporary file renamed into place)."""
    path = Path(repository) / cfg.name / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(format_config(cfg))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------- reading

_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>\#[^\n]*)|(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
    r"""|(?P<number>-?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+))|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)|(?P<punct>[{}\[\]:,;<>])"""
)


def _tokens(text: str, source: str) -> Iterator[tuple[str, str, int, int]]:
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"{source}:{line}:{pos - line_start + 1}: unexpected character {text[pos]!r}")
        kind, value = m.lastgroup or "", m.group()
        if kind not in ("ws", "comment"):
            yield kind, value, line, pos - line_start + 1
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = m.start() + value.rfind("\n") + 1
        pos = m.end()


class _Parser:
    """Protobuf text format into ``{field: [values...]}`` (every field a list; messages are dicts)."""

    def __init__(self, text: str, source: str) -> None:
        self.toks = list(_tokens(text, source))
        self.i = 0
        self.source = source

    def error(self, msg: str) -> ConfigError:
        if self.i < len(self.toks):
            _, value, line, col = self.toks[self.i]
            return ConfigError(f"{self.source}:{line}:{col}: {msg} (at {value!r})")
        return ConfigError(f"{self.source}: {msg} (at the end of the file)")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i][:2] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise self.error(f"expected {value!r}" if value else "unexpected end")
        self.i += 1
        return tok

    def message(self, close: str | None) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if close is not None:
                    raise self.error(f"missing {close!r}")
                return out
            if close is not None and tok[1] == close:
                self.i += 1
                return out
            kind, name = self.take()
            if kind != "ident":
                self.i -= 1
                raise self.error("expected a field name")
            nxt = self.peek()
            if nxt is not None and nxt[1] == ":":
                self.i += 1
                nxt = self.peek()
            if nxt is not None and nxt[1] == "[":
                self.i += 1
                values: list[Any] = []
                while True:
                    tok = self.peek()
                    if tok is not None and tok[1] == "]":
                        self.i += 1
                        break
                    values.append(self.value())
                    tok = self.peek()
                    if tok is not None and tok[1] == ",":
                        self.i += 1
                out.setdefault(name, []).extend(values)
            else:
                out.setdefault(name, []).append(self.value())
            tok = self.peek()
            if tok is not None and tok[1] in (",", ";"):
                self.i += 1

    def value(self) -> Any:
        kind, value = self.take()
        if value in ("{", "<"):
            return self.message("}" if value == "{" else ">")
        if kind == "string":
            return bytes(value[1:-1], "utf-8").decode("unicode_escape")
        if kind == "number":
            return float(value) if any(c in value for c in ".eE") else int(value)
        if kind == "ident":
            return {"true": True, "false": False}.get(value, value)
        self.i -= 1
        raise self.error("expected a value")


def _one(msg: dict[str, list[Any]], key: str, default: Any = None) -> Any:
    values = msg.get(key)
    return values[-1] if values else default


def _tensor(msg: Any, kind: str, source: str) -> TensorConfig:
    if not isinstance(msg, dict) or "name" not in msg:
        raise ConfigError(f"{source}: every {kind} needs a name")
    name = _one(msg, "name")
    triton_type = _one(msg, "data_type", "TYPE_FP32")
    if triton_type not in TRITON_TO_V2:
        raise ConfigError(f"{source}: {kind} {name!r}: unsupported data_type {triton_type!r}")
    dims = tuple(int(d) for d in msg.get("dims", []))
    return TensorConfig(name, TRITON_TO_V2[triton_type], dims)


def parse_config(text: str, source: str = CONFIG_FILE) -> ModelConfig:
    """A :class:`ModelConfig` from ``config.pbtxt`` text; ``ConfigError`` names ``source``, line and column."""
    msg = _Parser(text, source).message(None)
    if "name" not in msg:
        raise ConfigError(f"{source}: no model name")
    batching = _one(msg, "dynamic_batching", {}) or {}
    groups = msg.get("instance_group", [])
    count = sum(int(_one(g, "count", 1)) for g in groups) if groups else 1
    kind = _one(groups[0], "kind", "KIND_AUTO") if groups else "KIND_AUTO"
    policy_msg = _one(msg, "version_policy", {}) or {}
    policy, latest_n, specific = "latest", 1, []
    if "all" in policy_msg:
        policy = "all"
    elif "specific" in policy_msg:
        policy = "specific"
        specific = [int(v) for v in _one(policy_msg, "specific", {}).get("versions", [])]
    elif "latest" in policy_msg:
        latest_n = int(_one(_one(policy_msg, "latest", {}), "num_versions", 1))
    params = {}
    for p in msg.get("parameters", []):
        value = _one(p, "value", {})
        params[str(_one(p, "key"))] = str(_one(value, "string_value", "") if isinstance(value, dict) else value)
    return ModelConfig(
        name=str(_one(msg, "name")),
        platform=str(_one(msg, "platform", "onnxruntime_onnx")),
        max_batch_size=int(_one(msg, "max_batch_size", 0)),
        inputs=[_tensor(t, "input", source) for t in msg.get("input", [])],
        outputs=[_tensor(t, "output", source) for t in msg.get("output", [])],
        max_queue_delay_microseconds=int(_one(batching, "max_queue_delay_microseconds", 0)),
        preferred_batch_size=[int(b) for b in batching.get("preferred_batch_size", [])],
        instance_count=count,
        instance_kind=str(kind),
        version_policy=policy,
        latest_num_versions=latest_n,
        specific_versions=specific,
        parameters=params,
    )


def read_config(repository: str | Path, name: str) -> ModelConfig:
    """Parse ``REPO/NAME/config.pbtxt``; the model's name must match its directory."""
    path = Path(repository) / name / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
    cfg = parse_config(text, str(path))
    if cfg.name != name:
        raise ConfigError(f"{path}: name {cfg.name!r} differs from its directory {name!r}")
    return cfg


def model_names(repository: str | Path) -> list[str]:
    """Directories of ``repository`` that hold a ``config.pbtxt``, sorted."""
    root = Path(repository)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()) if root.is_dir() else []


def check_repository(repository: str | Path) -> None:
    """Refuse a path that cannot be a model repository: one that does not exist, a file, a model's own directory
    (it holds ``config.pbtxt`` or version directories) or a version directory (it holds ``model.onnx``). An
    empty directory is a repository: models may be written into it while the server polls."""
    root = Path(repository)
    layout = f"a model repository holds one directory per model: REPO/NAME/{CONFIG_FILE}, REPO/NAME/1/{MODEL_FILE}"
    if not root.exists():
        raise RepositoryError(f"{root} does not exist; {layout} (mtrec-export writes one)")
    if not root.is_dir():
        raise RepositoryError(f"{root} is a file, not a directory; {layout}")
    try:
        entries = list(root.iterdir())
    except OSError as err:
        raise RepositoryError(f"{root}: cannot list the directory ({err.strerror or err})") from err
    if (root / MODEL_FILE).is_file():
        raise RepositoryError(
            f"{root} is a version directory (it holds {MODEL_FILE}); give the repository, two levels up: "
            f"{root.resolve().parent.parent}"
        )
    if (root / CONFIG_FILE).is_file() or any(p.name.isdigit() and (p / MODEL_FILE).is_file() for p in entries):
        raise RepositoryError(
            f"{root} is a model directory, not a repository; give its parent: {root.resolve().parent}"
        )


def available_versions(repository: str | Path, name: str) -> list[int]:
    """Numeric version directories of a model that hold a ``model.onnx``, ascending."""
    root = Path(repository) / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file())


def served_versions(cfg: ModelConfig, available: list[int]) -> list[int]:
    """The versions ``cfg.version_policy`` selects from ``available`` (ascending)."""
    if cfg.version_policy == "all":
        return list(available)
    if cfg.version_policy == "specific":
        return [v for v in available if v in set(cfg.specific_versions)]
    return sorted(available)[-max(cfg.latest_num_versions, 1) :] if available else []
