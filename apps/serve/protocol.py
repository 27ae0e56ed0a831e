"""The Open Inference Protocol (KServe v2) over REST: inference requests and responses as JSON tensors and
as Triton's binary tensor data extension.

A binary request is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
tensors, in input order, of the inputs whose ``parameters.binary_data_size`` says how many bytes each
takes. A response puts an output in binary when the request asks for it (``binary_data`` on the output,
or ``binary_data_output`` on the request; tritonclient does by default), with ``binary_data_size`` on
the output and the same header. See https://github.com/kserve/open-inference-protocol and
triton-inference-server/server docs/protocol/extension_binary_data.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# OIP tensor datatypes and their numpy dtypes (BYTES, the variable-length one, is not served: no dlpipe model
# takes or returns strings).
DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64), ("FP16", np.float16),
    ("FP32", np.float32), ("FP64", np.float64))}
DATATYPE_OF: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}
# onnxruntime's type strings, for the model metadata.
ORT_DATATYPES = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
                 "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
                 "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
                 "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
                 "tensor(string)": "BYTES"}
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 16


class ProtocolError(ValueError):
    """A request that does not follow the protocol (answered 400)."""


@dataclass
class InferRequest:
    """A parsed inference request: its id, input arrays by name, and which outputs to return how."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output of the model
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False  # request-level ``binary_data_output``

    def wants_binary(self, name: str) -> bool:
        return name in self.binary_outputs or self.binary_default


def _header(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header of a request and the binary part after it."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {size} but the body has {len(body)} bytes")
        head, rest = body[:size], body[size:]
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object")
    return doc, rest


def _shape(tensor: dict, name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise ProtocolError(f"input '{name}': 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _dtype(tensor: dict, name: str) -> np.dtype:
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input '{name}': unsupported datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def _json_array(data: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A JSON ``data`` list (row-major flat or nested) as an array of ``shape``."""
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list")
    try:
        flat = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input '{name}': 'data' is not a list of {DATATYPE_OF[dtype]} values "
                            f"({type(exc).__name__}: {exc})") from None
    if flat.size != int(np.prod(shape)):
        raise ProtocolError(f"input '{name}': shape {list(shape)} takes {int(np.prod(shape))} values, "
                            f"'data' has {flat.size}")
    return flat.reshape(shape)


def _inputs(doc: dict, rest: bytes) -> dict[str, np.ndarray]:
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError("each input must be an object with a 'name'")
        name = tensor["name"]
        if name in arrays:
            raise ProtocolError(f"input '{name}' is given twice")
        shape, dtype = _shape(tensor, name), _dtype(tensor, name)
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            arrays[name] = _json_array(tensor.get("data"), dtype, shape, name)
            continue
        want = int(np.prod(shape)) * dtype.itemsize
        if not isinstance(size, int) or size != want:
            raise ProtocolError(f"input '{name}': binary_data_size is {size!r}, but shape {list(shape)} of "
                                f"{DATATYPE_OF[dtype]} takes {want} bytes")
        if offset + size > len(rest):
            raise ProtocolError(f"input '{name}': the body ends before its {size} bytes of binary data")
        arrays[name] = np.frombuffer(rest, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        offset += size
    if offset != len(rest):
        raise ProtocolError(f"the body has {len(rest) - offset} bytes of binary data that no input claims")
    return arrays


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an inference request (JSON, or JSON header plus binary tensors).

    Args:
        body: The whole request body.
        header_length: The ``Inference-Header-Content-Length`` header, None when absent.

    Raises:
        ProtocolError: anything malformed (answered 400).
    """
    doc, rest = _header(body, header_length)
    request_id = doc.get("id")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    outputs = doc.get("outputs")
    names, binary = None, set()
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in outputs]
        binary = {o["name"] for o in outputs if isinstance(o.get("parameters"), dict)
                  and o["parameters"].get("binary_data") is True}
    return InferRequest(id=str(request_id) if request_id is not None else None, inputs=_inputs(doc, rest),
                        outputs=names, binary_outputs=binary, binary_default=params.get("binary_data_output") is True)


def encode_infer_response(model: str, version: str, request: InferRequest, names: list[str],
                          arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers for the outputs ``names`` with values ``arrays``."""
    outputs, blobs = [], []
    for name, arr in zip(names, arrays):
        arr = np.ascontiguousarray(arr)
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE_OF.get(arr.dtype, "BYTES"),
                                 "shape": list(arr.shape)}
        if request.wants_binary(name):
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def tensor_metadata(name: str, ort_type: str, shape: list) -> dict[str, Any]:
    """One input's or output's metadata: name, datatype, shape with -1 for dynamic axes."""
    return {"name": name, "datatype": ORT_DATATYPES.get(ort_type, "BYTES"),
            "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in (shape or [])]}
