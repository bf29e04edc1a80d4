"""Open Inference Protocol (KServe v2) bodies, decoded and encoded in the worker, where tensors are
parsed once into numpy (the gateway forwards the raw bytes). Supports the binary-data extension for
inputs: a JSON header of `header_length` bytes followed by the binary tensors in input order."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from inferline.server.errors import InputError, MalformedInput
from inferline.server.tensors import DTYPES, datatype_of


def _field(i: int, key: str) -> str:
    return f"inputs[{i}].{key}"


def decode_request(body: bytes, header_length: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse a v2 infer body into (request JSON, {input name: array}). Raises InputError naming the field."""
    head, binary = (body[:header_length], body[header_length:]) if header_length else (body, b"")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise MalformedInput(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(request, dict):
        raise InputError("body must be a JSON object", field="body")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("`inputs` must be a non-empty list of tensors", field="inputs")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise InputError(f"inputs[{i}] must be an object", field=f"inputs[{i}]")
        name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
        if not isinstance(name, str) or not name:
            raise InputError(f"inputs[{i}].name must be a non-empty string", field=_field(i, "name"))
        if name in tensors:   # one of the two would be dropped unseen: the client's bug, refused like Triton does
            raise MalformedInput(f"input `{name}` is given twice (inputs[{i}]); each input tensor once",
                                 field=_field(i, "name"))
        if datatype not in DTYPES:
            raise InputError(f"inputs[{i}].datatype must be one of {sorted(DTYPES)}; given {datatype!r}",
                             field=_field(i, "datatype"))
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in shape)):
            raise InputError(f"inputs[{i}].shape must be a list of non-negative ints; given {shape!r}",
                             field=_field(i, "shape"))
        count = math.prod(shape)
        params = spec.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InputError(f"inputs[{i}].parameters.binary_data_size {size!r} runs past the binary data "
                                 f"({len(binary) - offset} bytes left)", field=_field(i, "parameters.binary_data_size"))
            array = _from_binary(binary[offset:offset + size], datatype, count, i)
            offset += size
        else:
            array = _from_json(spec.get("data"), datatype, count, i)
        tensors[name] = array.reshape(shape)
    return request, tensors


def _from_binary(raw: bytes, datatype: str, count: int, i: int) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InputError(f"inputs[{i}] BYTES element header truncated", field=_field(i, "data"))
            (n,) = struct.unpack_from("<I", raw, pos)
            items.append(raw[pos + 4:pos + 4 + n])
            pos += 4 + n
        if len(items) != count or pos != len(raw):
            raise InputError(f"inputs[{i}] has {len(items)} BYTES elements; its shape needs {count}",
                             field=_field(i, "shape"))
        return np.array(items, dtype=object)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"inputs[{i}] has {len(raw)} bytes of {datatype}; its shape needs {count * dtype.itemsize}",
                         field=_field(i, "parameters.binary_data_size"))
    return np.frombuffer(raw, dtype=dtype)


def _from_json(data: Any, datatype: str, count: int, i: int) -> np.ndarray:
    if data is None:
        raise InputError(f"inputs[{i}].data is missing (and no binary_data_size was given)", field=_field(i, "data"))
    if datatype == "BYTES":
        flat = _flatten(data)
        items = [x.encode() if isinstance(x, str) else x for x in flat]
        if not all(isinstance(x, bytes) for x in items):
            raise InputError(f"inputs[{i}].data must hold strings for BYTES", field=_field(i, "data"))
        array = np.array(items, dtype=object)
    else:
        try:
            array = np.asarray(data, dtype=DTYPES[datatype]).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise InputError(f"inputs[{i}].data must hold {datatype} numbers in a flat or nested list",
                             field=_field(i, "data")) from None
    if array.size != count:
        raise InputError(f"inputs[{i}] has {array.size} elements; its shape needs {count}", field=_field(i, "shape"))
    return array


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x)) if isinstance(x, list) else out.append(x)
    return out


def encode_response(model: str, version: str, request_id: str | None, outputs: dict[str, np.ndarray],
                    requested: list[str] | None) -> bytes:
    """The v2 response body with JSON outputs (always allowed by the protocol, even when binary was asked)."""
    names = requested or list(outputs)
    tensors = []
    for name in names:
        array = outputs[name]
        datatype = datatype_of(array)
        if datatype == "BYTES":
            data: Any = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
        else:
            data = array.reshape(-1)
        tensors.append({"name": name, "datatype": datatype, "shape": list(array.shape), "data": data})
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def requested_outputs(request: dict[str, Any], known: list[str]) -> list[str] | None:
    """The output names the request asked for, checked against what the model has."""
    outs = request.get("outputs")
    if outs is None:
        return None
    if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
        raise InputError("`outputs` must be a list of objects with a name", field="outputs")
    names = [o["name"] for o in outs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown output {unknown[0]!r}; this model has {known}", field="outputs")
    return names
