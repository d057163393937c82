"""Open Inference Protocol (KServe v2) inference requests and responses, JSON and binary tensors.

The wire format, from the KServe v2 REST spec (``kserve/docs/predict-api/v2/required_api.md``) and
Triton's binary tensor data extension (``triton-inference-server/server/docs/protocol/extension_binary_data.md``),
matched against the ``tritonclient.http`` client (``_infer_input.py``, ``_requested_output.py``,
``_utils._get_inference_request``, ``_infer_result.py``):

* A request body is a JSON object, optionally followed by raw tensor bytes. When bytes follow, the HTTP
  header ``Inference-Header-Content-Length`` gives the length of the JSON part; the bytes of every input
  whose ``parameters.binary_data_size`` is set follow in the order of ``inputs``, each exactly that long.
  Other inputs carry ``data``: a flat or nested (row-major) JSON list.
* ``outputs`` (optional) names the outputs to return, each with ``parameters.binary_data`` (bool). Without
  ``outputs`` every output is returned, in binary iff the request parameter ``binary_data_output`` is true
  (what ``tritonclient`` sends when no outputs are requested).
* A response with any binary output is a JSON object followed by the raw bytes of those outputs in output
  order, with ``Inference-Header-Content-Length``; the JSON gives each its ``parameters.binary_data_size``.
* ``BYTES`` elements in binary form are a 4-byte little-endian length followed by the bytes
  (``tritonclient.utils.serialize_byte_tensor``); in JSON they are strings. ONNX Runtime's string tensors take
  Python ``str`` (it would turn ``bytes`` into their ``repr``), so BYTES inputs must be UTF-8 and are decoded.

Everything here is plain functions over ``bytes`` and numpy, so the server's hot path is a JSON parse, a
few dict lookups and ``numpy.frombuffer`` per input (zero copy). Every malformed request raises
:class:`InferenceError` with an HTTP status and a message that names the tensor, what was expected and
what came.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.repository import V2_TO_NUMPY, ModelConfig, TensorConfig

HEADER_LENGTH = "Inference-Header-Content-Length"

# numpy kinds a JSON list may parse to, per target datatype: integers may not arrive as floats, booleans only
# as JSON true/false; floats accept integers (JSON ``1`` for ``1.0``).
_JSON_KINDS = {"BOOL": "b", "UINT8": "iu", "INT8": "iu", "INT16": "iu", "INT32": "iu", "INT64": "iu", "FP16": "iuf"}
_JSON_KINDS.update({"FP32": "iuf", "FP64": "iuf"})
_LENGTH = struct.Struct("<I")
json_dumps = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON text of a value (NaN and infinities spelled as JavaScript does, which rapidjson reads)."""


class InferenceError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, ``str(err)`` the client-facing message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output as the server checks it: ``shape`` is the full wire shape, ``-1`` where any size is
    accepted (the batch axis first when the model batches); the rest is precomputed for the parser."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every axis with a fixed size
    variable: bool  # a non-batch axis of variable size: requests may then not concatenate
    quoted_name: str  # the name as a JSON string, for the response header


class Signature:
    """The tensors of one model version with everything the request parser needs precomputed.

    ``max_batch_size > 0`` means the first axis of every input and output is the batch axis (Triton's
    convention: ``dims`` in ``config.pbtxt`` leave it out); ``0`` means no batch axis and no batching.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.model = cfg.name
        self.max_batch_size = cfg.max_batch_size
        batch = (-1,) if cfg.max_batch_size > 0 else ()
        self.inputs = {t.name: _spec(t, batch) for t in cfg.inputs}
        self.outputs = {t.name: _spec(t, batch) for t in cfg.outputs}
        self.input_names = list(self.inputs)
        self.output_names = list(self.outputs)
        self.variable = any(s.variable for s in self.inputs.values())


def _spec(t: TensorConfig, batch: tuple[int, ...]) -> TensorSpec:
    shape = batch + tuple(t.dims)
    fixed = tuple((axis, d) for axis, d in enumerate(shape) if d >= 0)
    variable = any(d < 0 for d in t.dims)
    return TensorSpec(t.name, t.datatype, np.dtype(V2_TO_NUMPY[t.datatype]), shape, fixed, variable, json.dumps(t.name))


def _fmt(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(slots=True)
class InferRequest:
    """A parsed, validated inference request.

    ``inputs`` holds one array per model input in the model's input order; ``rows`` is the batch size (1 for
    a model without a batch axis); ``outputs`` the names to compute and return, in response order, with
    ``binary[i]`` saying whether output ``i`` goes back as raw bytes."""

    id: Any
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: list[str]
    binary: list[bool]


# ------------------------------------------------------------------------------------------------ requests


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip | deflate`` (``tritonclient``'s ``request_compression_algorithm``),
    refusing (413) output beyond ``limit`` bytes so a small compressed body cannot exhaust memory."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InferenceError(f"unsupported Content-Encoding {encoding!r}; expected gzip, deflate or identity", 415)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise InferenceError(f"request body is not valid {encoding} data: {err}") from err
    if len(out) > limit:
        raise InferenceError(f"decompressed request body exceeds the limit of {limit} bytes", 413)
    return out


def parse_infer_request(body: bytes, header_length: str | None, sig: Signature) -> InferRequest:
    """Parse and validate an inference request for the model ``sig`` describes.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (``None`` when the whole body is
    JSON). Binary inputs become read-only zero-copy views of ``body``. Written for the hot path: type checks
    are exact (``type(x) is int``, which also refuses JSON booleans) and messages are built only on error.
    """
    size = len(body)
    if header_length is None:
        json_end = size
    else:
        try:
            json_end = int(header_length)
        except ValueError:
            raise InferenceError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < json_end <= size:
            raise InferenceError(f"{HEADER_LENGTH} is {json_end} but the request body has {size} bytes")
    try:
        header = json.loads(body if json_end == size else body[:json_end])
    except (ValueError, UnicodeDecodeError) as err:
        raise InferenceError(f"malformed JSON in the inference request: {err}") from None
    if type(header) is not dict:
        raise InferenceError(f"the inference request must be a JSON object, got {type(header).__name__}")
    return parse_infer_header(header, body, json_end, sig)


def parse_infer_header(header: dict[str, Any], body: bytes, json_end: int, sig: Signature) -> InferRequest:
    """Validate an inference request whose JSON header is already decoded: ``body[json_end:]`` holds the binary
    tensors its inputs' ``binary_data_size`` refer to, in input order. :func:`parse_infer_request` calls it;
    the gRPC front end (:mod:`serving.grpc_server`) builds the header from the protobuf and calls it directly."""
    size = len(body)
    raw_inputs = header.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise InferenceError("the inference request needs a non-empty list 'inputs'")

    specs = sig.inputs
    max_batch = sig.max_batch_size
    found: dict[str, np.ndarray] = {}
    offset = json_end
    rows = -1
    for item in raw_inputs:
        name = item.get("name") if type(item) is dict else None
        spec = specs.get(name) if type(name) is str else None
        if spec is None or name in found:
            raise _input_error(item, sig, found)
        shape = item.get("shape")
        if type(shape) is not list or not _accepts(spec, shape):
            raise _shape_error(spec, shape, max_batch)
        if max_batch:
            if not 0 < shape[0] <= max_batch:
                raise _shape_error(spec, shape, max_batch)
            if shape[0] != rows:
                if rows >= 0:
                    raise InferenceError(
                        f"inputs disagree on the batch size (first axis): input {name!r} has {shape[0]}, "
                        f"{next(iter(found))!r} has {rows}"
                    )
                rows = shape[0]
        if item.get("datatype") != spec.datatype:
            raise InferenceError(f"input {name!r}: expected datatype {spec.datatype}, got {item.get('datatype')!r}")
        params = item.get("parameters")
        nbytes = None
        if params is not None:
            if type(params) is not dict:
                raise InferenceError(f"input {name!r}: 'parameters' must be an object, got {params!r:.100}")
            if "shared_memory_region" in params:
                raise InferenceError(f"input {name!r}: shared memory is not supported by this server; send the data")
            nbytes = params.get("binary_data_size")
        if nbytes is not None:
            if type(nbytes) is not int or nbytes < 0:
                raise InferenceError(f"input {name!r}: binary_data_size must be a non-negative integer, got {nbytes!r}")
            if "data" in item:
                raise InferenceError(f"input {name!r} has both 'data' and parameters.binary_data_size")
            if offset + nbytes > size:
                raise InferenceError(
                    f"input {name!r}: binary_data_size {nbytes} runs past the end of the request body "
                    f"({size - offset} binary bytes left at offset {offset - json_end})"
                )
            found[name] = _from_binary(body, offset, nbytes, shape, spec)
            offset += nbytes
        elif "data" in item:
            found[name] = _from_json(item["data"], shape, spec)
        else:
            raise InferenceError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != size:
        raise InferenceError(
            f"the request carries {size - json_end} bytes of binary tensor data but its inputs' "
            f"binary_data_size add up to {offset - json_end}"
        )
    if len(found) != len(specs):
        missing = [s for s in specs if s not in found]
        raise InferenceError(
            "missing input(s) "
            + ", ".join(f"{n!r} ({specs[n].datatype}, shape {_fmt(specs[n].shape)})" for n in missing)
            + f" for model {sig.model!r}"
        )
    names = sig.input_names
    if len(names) > 1 and any(a != b for a, b in zip(found, names)):
        found = {n: found[n] for n in names}  # the model's input order, which the batcher relies on

    params = header.get("parameters")
    default_binary = params.get("binary_data_output", False) is True if type(params) is dict else False
    raw_outputs = header.get("outputs")
    if raw_outputs is None:
        outputs = sig.output_names
        binary = [default_binary] * len(outputs)
    else:
        outputs, binary = _requested_outputs(raw_outputs, sig, default_binary)
    return InferRequest(header.get("id"), found, rows if max_batch else 1, outputs, binary)


def _accepts(spec: TensorSpec, shape: list[Any]) -> bool:
    if len(shape) != len(spec.shape):
        return False
    for d in shape:
        if type(d) is not int or d < 0:
            return False
    for axis, d in spec.fixed:
        if shape[axis] != d:
            return False
    return True


def _input_error(item: Any, sig: Signature, found: dict[str, np.ndarray]) -> InferenceError:
    name = item.get("name") if type(item) is dict else None
    if type(name) is not str:
        return InferenceError(f"every entry of 'inputs' must be an object with a string 'name', got {item!r:.200}")
    if name in found:
        return InferenceError(f"input {name!r} appears twice in the request")
    expected = ", ".join(map(repr, sig.inputs))
    return InferenceError(f"unknown input {name!r} for model {sig.model!r}; expected inputs: {expected}")


def _shape_error(spec: TensorSpec, shape: Any, max_batch: int) -> InferenceError:
    if type(shape) is not list or not all(type(d) is int for d in shape):
        return InferenceError(f"input {spec.name!r}: 'shape' must be a list of integers, got {shape!r:.200}")
    if max_batch and _accepts(spec, shape):
        return InferenceError(
            f"input {spec.name!r}: batch size (first axis) must be between 1 and max_batch_size {max_batch}, "
            f"got {shape[0]}"
        )
    batch = " (first axis: batch)" if max_batch else ""
    return InferenceError(
        f"input {spec.name!r}: expected shape {_fmt(spec.shape)}{batch}, -1 meaning any size, got {_fmt(shape)}"
    )


def _from_binary(body: bytes, offset: int, nbytes: int, shape: list[int], spec: TensorSpec) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        return _bytes_from_binary(memoryview(body)[offset : offset + nbytes], count, shape, spec.name)
    expected = count * spec.dtype.itemsize
    if nbytes != expected:
        raise InferenceError(
            f"input {spec.name!r}: shape {_fmt(shape)} of {spec.datatype} needs {expected} bytes, "
            f"binary_data_size is {nbytes}"
        )
    return np.frombuffer(body, dtype=spec.dtype, count=count, offset=offset).reshape(shape)


def _bytes_from_binary(view: memoryview, count: int, shape: list[int], name: str) -> np.ndarray:
    out = np.empty(count, dtype=np.object_)
    pos, end = 0, len(view)
    for i in range(count):
        if pos + 4 > end:
            raise InferenceError(f"input {name!r}: BYTES data ends after {i} of {count} elements")
        (n,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InferenceError(f"input {name!r}: BYTES element {i} claims {n} bytes, {end - pos} left")
        try:
            out[i] = str(view[pos : pos + n], "utf-8")
        except UnicodeDecodeError as err:
            raise InferenceError(
                f"input {name!r}: BYTES element {i} is not UTF-8 ({err.reason}); ONNX string tensors hold text"
            ) from None
        pos += n
    if pos != end:
        raise InferenceError(f"input {name!r}: {end - pos} bytes left over after {count} BYTES elements")
    return out.reshape(shape)


def _from_json(data: Any, shape: list[int], spec: TensorSpec) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        flat = _flatten(data, spec.name)
        if len(flat) != count:
            raise InferenceError(
                f"input {spec.name!r}: shape {_fmt(shape)} needs {count} elements, data has {len(flat)}"
            )
        out = np.empty(count, dtype=np.object_)
        for i, v in enumerate(flat):
            if not isinstance(v, str):
                raise InferenceError(f"input {spec.name!r}: BYTES data must be strings, element {i} is {v!r:.50}")
            out[i] = v
        return out.reshape(shape)
    try:
        arr = np.asarray(data)
    except ValueError as err:  # ragged nesting
        raise InferenceError(f"input {spec.name!r}: 'data' is not a regular (rectangular) list: {err}") from None
    if arr.size != count:
        raise InferenceError(f"input {spec.name!r}: shape {_fmt(shape)} needs {count} elements, data has {arr.size}")
    if arr.dtype.kind not in _JSON_KINDS[spec.datatype] and count:
        got = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers with a fraction"}.get(
            arr.dtype.kind, "strings or mixed values"
        )
        raise InferenceError(f"input {spec.name!r}: datatype {spec.datatype} cannot hold 'data' of {got}")
    if arr.dtype.kind in "iu" and spec.dtype.kind in "iu" and count:
        info = np.iinfo(spec.dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InferenceError(f"input {spec.name!r}: values outside the range of {spec.datatype}")
    return arr.astype(spec.dtype, copy=False).reshape(shape)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise InferenceError(f"input {name!r}: 'data' must be a list, got {type(data).__name__}")
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    for v in data:
        out.extend(_flatten(v, name) if isinstance(v, list) else [v])
    return out


def _requested_outputs(raw: Any, sig: Signature, default_binary: bool) -> tuple[list[str], list[bool]]:
    if not isinstance(raw, list):
        raise InferenceError(f"'outputs' must be a list of objects, got {type(raw).__name__}")
    names: list[str] = []
    binary: list[bool] = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InferenceError(f"every entry of 'outputs' must be an object with a 'name', got {item!r:.200}")
        if name not in sig.outputs:
            raise InferenceError(
                f"unknown output {name!r} requested from model {sig.model!r}; "
                f"expected outputs: {', '.join(map(repr, sig.outputs))}"
            )
        if name in names:
            raise InferenceError(f"output {name!r} is requested twice")
        params = item.get("parameters")
        if isinstance(params, dict):
            if "shared_memory_region" in params:
                raise InferenceError(f"output {name!r}: shared memory is not supported by this server")
            if params.get("classification"):
                raise InferenceError(f"output {name!r}: the classification extension is not supported")
            binary.append(bool(params.get("binary_data", default_binary)))
        else:
            binary.append(default_binary)
        names.append(name)
    return names, binary


# ----------------------------------------------------------------------------------------------- responses


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: Any,
    names: list[str],
    arrays: list[np.ndarray],
    datatypes: list[str],
    binary: list[bool],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON part (to send as
    ``Inference-Header-Content-Length``). Binary outputs follow the JSON in output order.

    The JSON is assembled from strings (names JSON-quoted, datatypes and shapes are plain tokens): half the time
    of building dicts for ``json.dumps``, on every request. Output values in JSON are ``tolist()`` floats, whose
    shortest repr parses back to the same float32/float16 bits.
    """
    parts = []
    chunks: list[Any] = []
    for name, arr, datatype, as_binary in zip(names, arrays, datatypes, binary):
        shape = ",".join(map(str, arr.shape))
        if as_binary:
            raw = bytes_to_binary(arr) if datatype == "BYTES" else _contiguous(arr)
            chunks.append(raw)
            parts.append(
                f'{{"name":{_quote(name)},"datatype":"{datatype}","shape":[{shape}],'
                f'"parameters":{{"binary_data_size":{len(raw)}}}}}'
            )
        else:
            data = json_dumps(_to_json_list(arr, datatype))  # NaN / Infinity as JavaScript spells them
            parts.append(f'{{"name":{_quote(name)},"datatype":"{datatype}","shape":[{shape}],"data":{data}}}')
    request = "" if request_id is None else f',"id":{json_dumps(request_id)}'
    head = (
        f'{{"model_name":{_quote(model_name)},"model_version":{_quote(model_version)}{request},'
        f'"outputs":[{",".join(parts)}]}}'
    ).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


@functools.lru_cache(maxsize=4096)
def _quote(text: str) -> str:
    return json_dumps(text)


def _contiguous(arr: np.ndarray) -> memoryview:
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return memoryview(arr).cast("B")


def bytes_to_binary(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.ravel():
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(_LENGTH.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _to_json_list(arr: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
    return arr.ravel().tolist()


def error_body(message: str) -> bytes:
    """``{"error": message}``, the v2 protocol's error object."""
    return json_dumps({"error": message}).encode()
