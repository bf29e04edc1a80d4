"""Tensor fields for request and response types, and the Open Inference Protocol tensor each field maps to.

`Tensor[np.float32, 28, 28]` is a pydantic field type: it accepts a numpy array or nested JSON lists and holds a numpy
array of that datatype and shape (-1 = any size). A value whose element count matches a fully fixed shape is
reshaped (a flat 784-float row for a [28, 28] image). A numpy value of another datatype kind is refused, never cast:
INT32 data for an FP32 tensor is the caller's mistake, and Triton refuses it too.

`field_tensor()` derives the v2 tensor of any field of a request or response type: str -> BYTES, int -> INT64,
float -> FP32, bool -> BOOL, list[float] -> FP32 [-1], Tensor[...] -> its own. Each v2 tensor gets a leading batch
dimension: a v2 request of N rows carries N inputs. Importable without any model framework.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
DATATYPE_OF = {np.dtype(v).name: k for k, v in DTYPES.items() if k != "BYTES"}
_BY_DTYPE = {np.dtype(v): k for k, v in DTYPES.items()}   # dtype objects hash fast; dtype.name does not
JSON_ITEM = {"BOOL": {"type": "boolean"}, "BYTES": {"type": "string"}}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One Open Inference Protocol tensor: name, datatype (FP32, INT64, BYTES, ...), shape (-1 = any)."""

    name: str
    datatype: str
    shape: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name of a numpy array (object arrays are BYTES)."""
    found = _BY_DTYPE.get(array.dtype)
    return found if found is not None else DATATYPE_OF[array.dtype.newbyteorder("=").name]


_KINDS = {k: {"BOOL": "b", "BYTES": "O"}.get(k, "f" if k.startswith("FP") else "i") for k in DTYPES}


def _kind(datatype: str) -> str:
    return _KINDS[datatype]


@dataclass(frozen=True, slots=True)
class TensorType:
    """The metadata behind Tensor[...]: a v2 datatype and a shape without the batch dimension."""

    datatype: str
    shape: tuple[int, ...]

    def coerce(self, value: Any) -> np.ndarray:
        """The value as an array of this datatype and shape. Raises ValueError naming what is wrong."""
        dtype = DTYPES[self.datatype]
        if isinstance(value, np.ndarray) and value.dtype == dtype and self._fits(value.shape):   # the common case
            if _kind(self.datatype) == "f" and not np.isfinite(value).all():
                raise ValueError("must hold finite numbers")
            return value
        if isinstance(value, np.ndarray):
            given = datatype_of(value)
            if _kind(given) != _kind(self.datatype) and not (_kind(given) == "i" and _kind(self.datatype) == "f"
                                                             and value.dtype.itemsize <= 2):
                raise ValueError(f"datatype {given} does not match the declared {self.datatype}")
            array = value.astype(dtype, copy=False)
        else:
            try:
                array = np.asarray(value, dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise ValueError(f"must hold {self.datatype} values in a flat or nested list") from None
        if _kind(self.datatype) == "f" and not np.isfinite(array).all():
            raise ValueError("must hold finite numbers")
        if self._fits(array.shape):
            return array
        if -1 not in self.shape and array.size == math.prod(self.shape):
            return array.reshape(self.shape)
        raise ValueError(f"must have shape {list(self.shape)}; given {list(array.shape)}")

    def _fits(self, shape: tuple[int, ...]) -> bool:
        if shape == self.shape:
            return True
        return len(shape) == len(self.shape) and all(w in (-1, g) for w, g in zip(self.shape, shape, strict=True))

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: Any) -> np.ndarray:
            try:
                return self.coerce(value)
            except ValueError as exc:
                raise PydanticCustomError("tensor", str(exc)) from None

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda a: a.tolist()))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        item: dict[str, Any] = JSON_ITEM.get(self.datatype, {"type": "number" if _kind(self.datatype) == "f"
                                                             else "integer"})
        for size in reversed(self.shape):
            item = {"type": "array", "items": item, **({"minItems": size, "maxItems": size} if size >= 0 else {})}
        return {**item, "description": f"{self.datatype} tensor of shape {list(self.shape)}"}


class Tensor:
    """`Tensor[np.float32, 28, 28]` (or `Tensor["FP32", 28, 28]`): a field holding a numpy array of that datatype
    and shape (-1 = any)."""

    def __class_getitem__(cls, params: Any) -> Any:
        datatype, *shape = params if isinstance(params, tuple) else (params,)
        if not isinstance(datatype, str):   # a numpy scalar type: np.float32 -> FP32
            datatype = "BYTES" if datatype in (bytes, str, object) else DATATYPE_OF.get(np.dtype(datatype).name)
        if datatype not in DTYPES:
            raise TypeError(f"Tensor datatype must be one of {sorted(DTYPES)}; given {datatype!r}")
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise TypeError(f"Tensor dimensions must be ints (-1 = any); given {shape!r}")
        return Annotated[np.ndarray, TensorType(datatype, tuple(shape))]


SCALARS: dict[Any, str] = {bool: "BOOL", int: "INT64", float: "FP32", str: "BYTES", bytes: "BYTES"}


def field_tensor(name: str, annotation: Any) -> TensorSpec | None:
    """The v2 tensor (batch dimension first) that a field of this type maps to, or None when it has no tensor form
    (nested models, dicts, unions of several types)."""
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        for meta in extra:
            if isinstance(meta, TensorType):
                return TensorSpec(name, meta.datatype, [-1, *meta.shape])
        return field_tensor(name, base)
    if annotation in SCALARS:
        return TensorSpec(name, SCALARS[annotation], [-1])
    if typing.get_origin(annotation) in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if len(args) == 1 and _strip_optional(args[0]) in SCALARS:
            return TensorSpec(name, SCALARS[_strip_optional(args[0])], [-1, -1])
    return None


def scalar_datatype(spec: TensorSpec) -> bool:
    """True for a field of one value per row (shape [-1])."""
    return spec.shape == [-1]


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
