"""Open Inference Protocol tensors from and to numpy, on the client side. Inputs go as the binary-data extension by
default (a JSON header, then each tensor's raw little-endian bytes; BYTES items each prefixed with a 4-byte length),
as tritonclient sends them; outputs are read from JSON data or from binary data, whichever the server sent."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from inferline.server.tensors import DTYPES, datatype_of

HEADER_LENGTH = "inference-header-content-length"


def as_array(value: Any) -> np.ndarray:
    """A numpy array of a v2 datatype: text and bytes become BYTES (object) arrays."""
    array = np.asarray(value)
    if array.dtype.kind in ("U", "S"):
        array = array.astype(object)
    return array


def encode_request(inputs: Mapping[str, Any], parameters: Mapping[str, Any] | None, outputs: list[str] | None,
                   binary: bool, request_id: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer request carrying `inputs` (name -> array-like)."""
    tensors, blobs = [], []
    for name, value in inputs.items():
        array = as_array(value)
        datatype = datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            blob = to_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = array.reshape(-1)
            tensor["data"] = [x.decode() if isinstance(x, bytes) else x for x in flat.tolist()]
        tensors.append(tensor)
    request: dict[str, Any] = {"id": request_id, "inputs": tensors}
    if parameters:
        request["parameters"] = dict(parameters)
    if outputs:
        request["outputs"] = [{"name": n} for n in outputs]
    header = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        items = [x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(x)) + x for x in items)
    return np.ascontiguousarray(array, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def decode_response(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The infer response with each output's data as a numpy array of its shape, under "outputs" by name."""
    raw = headers.get(HEADER_LENGTH)
    head, binary = (body[:int(raw)], body[int(raw):]) if raw and raw.isdigit() else (body, b"")
    response: dict[str, Any] = orjson.loads(head)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for out in response.get("outputs", []):
        datatype, shape = out["datatype"], out["shape"]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[out["name"]] = from_bytes(binary[offset:offset + size], datatype).reshape(shape)
            offset += size
        elif datatype == "BYTES":
            items = [x.encode() if isinstance(x, str) else x for x in np.asarray(out["data"], dtype=object).ravel()]
            arrays[out["name"]] = np.array(items, dtype=object).reshape(shape)
        else:
            arrays[out["name"]] = np.asarray(out["data"], dtype=DTYPES[datatype]).reshape(shape)
    response["outputs"] = arrays
    return response


def from_bytes(raw: bytes, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos + 4 <= len(raw):
            (n,) = struct.unpack_from("<I", raw, pos)
            items.append(raw[pos + 4:pos + 4 + n])
            pos += 4 + n
        return np.array(items, dtype=object)
    return np.frombuffer(raw, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).copy()
