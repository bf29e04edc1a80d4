"""Requests <-> rows of a Model's request and response types, for the batch path.

A request carries one row (a JSON object), several rows (`texts` of a text classifier), raw bytes (the model's
`decode` hook makes the row), or Open Inference Protocol tensors (a v2 request of N rows becomes N rows: each row
takes its slice of every input tensor, and fields sent as no tensor come from the request's `parameters` or their
defaults). Each row is validated with the request type: a bad one fails its request alone, naming the field.
Answers go back as `{"model", "version", **row}` (one row), `{"model", "version", "results": [...]}` (several),
or v2 output tensors stacked from the rows' fields.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from inferline.server.broker.delivery import Delivery
from inferline.server.errors import InferlineError, InputError, MalformedInput, describe_validation, typed
from inferline.server.limits import MAX_ROWS, MAX_SERIES, MAX_TEXT_CHARS
from inferline.server.model import Model, signature
from inferline.server.protocol import OP_PREDICT, OP_V2, decode_payload, dumps
from inferline.server.tensors import DTYPES, TensorSpec, TensorType, datatype_of
from inferline.server.worker import v2codec

ONE, MANY, V2 = "one", "many", "v2"


@dataclass(slots=True)
class Item:
    """A delivery after decoding: its validated rows, and how its answer is shaped."""

    delivery: Delivery
    rows: list[Any]
    form: str                           # ONE | MANY | V2
    v2_id: str | None = None
    v2_outputs: list[str] | None = None


class RowCodec:
    """Decodes deliveries into rows and encodes the model's outputs, for one loaded model."""

    def __init__(self, model: Model, name: str) -> None:
        self.model = model
        self.name = name
        sig = signature(type(model))
        self.request: type[BaseModel] | None = sig.request
        self.response: type[BaseModel] | None = sig.response
        self.inputs = {t.name: t for t in [*sig.inputs, *sig.optional]}
        self.outputs = {t.name: t for t in sig.outputs}
        self.required = sig.inputs
        fields = self.request.model_fields if self.request is not None else {}
        self.text_fields = {n for n, f in fields.items() if _is_str(f.annotation)}
        self.list_fields = {n for n, f in fields.items() if typing.get_origin(f.annotation) in (list, tuple)}
        # the names a row's field may be sent under, as a v2 parameter: its own, or its alias (`raise` for `fail`)
        self.field_names: set[str] | None = None if self.request is None else (
            set(fields) | {f.alias for f in fields.values() if f.alias})
        # Tensor fields and nothing else: a v2 request's rows are checked per column (see _tensor_rows)
        self.tensor_only = _tensor_only(self.request)

    # decoding --------------------------------------------------------------------------------------------------
    def decode(self, d: Delivery) -> Item:
        """The delivery's rows. Raises InputError (or MalformedInput) naming what is wrong."""
        try:
            params, blob = decode_payload(d.payload)
        except ValueError as exc:   # not the caller's fault: the entry was written wrongly (by hand, an old gateway)
            raise typed("internal", f"request {d.request_id} has an unreadable payload: {exc}") from None
        if d.envelope.op == OP_PREDICT:
            if blob:
                try:
                    row = self.model.decode(blob, params.get("options") or {})
                except ValidationError as exc:   # the hook built a row from bad options
                    message, field = describe_validation(exc.errors(include_url=False))
                    raise InputError(message, field=field) from None
                return Item(d, [self.validate(row)], ONE)
            if "rows" in params:
                rows = params["rows"]
                if not isinstance(rows, list) or not rows:
                    raise InputError("`rows` must be a non-empty list of request objects", field="rows")
                if len(rows) > MAX_ROWS:
                    raise InputError(f"`rows` holds {len(rows)} rows; at most {MAX_ROWS} (MAX_ROWS) per request",
                                     field="rows")
                return Item(d, [self.validate(r, f"rows[{i}].") for i, r in enumerate(rows)], MANY)
            return Item(d, [self.validate(params.get("row", {}))], ONE)
        if d.envelope.op == OP_V2:
            return self.decode_v2(d, blob, params.get("header_length"))
        raise InputError(f"op {d.envelope.op!r} is not served by model {self.name}", field="op")

    def validate(self, raw: Any, prefix: str = "") -> Any:
        """One row as the request type (a dict when the model declares none)."""
        if self.request is None or isinstance(raw, self.request):
            return raw
        try:
            return self.request.model_validate(raw)
        except ValidationError as exc:
            message, field = describe_validation(exc.errors(include_url=False), prefix)
            raise InputError(message, field=field) from None

    def decode_v2(self, d: Delivery, body: bytes, header_length: int | None) -> Item:
        if not self.inputs:
            raise InputError(f"model {self.name} declares no tensor inputs; call its predict route instead",
                             field="inputs")
        request, tensors = v2codec.decode_request(body, header_length)
        outputs = v2codec.requested_outputs(request, list(self.outputs))
        parameters = request.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError("`parameters` must be an object", field="parameters")
        columns: dict[str, np.ndarray] = {}
        for name, array in tensors.items():
            spec = self.inputs.get(name)
            if spec is None:
                raise InputError(f"unknown input tensor `{name}`; model {self.name} takes {list(self.inputs)}",
                                 field=name)
            columns[name] = _batch_major(array, spec)
        missing = [t.name for t in self.required if t.name not in columns and t.name not in parameters]
        if missing:
            spec = self.inputs[missing[0]]
            raise InputError(f"missing input tensor `{spec.name}` ({spec.datatype} {spec.shape})", field=spec.name)
        sizes = {len(c) for c in columns.values()}
        if len(sizes) > 1:
            raise InputError(f"input tensors must share their first (batch) dimension; given {sorted(sizes)}",
                             field="inputs")
        # Fields sent as parameters. Only the row's own: the others are the protocol's (tritonclient's
        # binary_data_output, a KServe client's own), which a row type that forbids unknown fields would refuse.
        names = self.field_names if self.field_names is not None else parameters
        shared = {k: v for k, v in parameters.items() if k not in columns and k in names}
        n = sizes.pop() if sizes else 1
        if n < 1:
            first = next(iter(columns))
            raise InputError(f"input `{first}` has no rows (its first dimension is 0)", field=first)
        if n > MAX_ROWS:   # the same cap as a task route's `texts`: one request is never an unbounded batch
            first = next(iter(columns))
            raise InputError(f"input `{first}` has {n} rows (its first dimension); at most {MAX_ROWS} (MAX_ROWS) "
                             "per request", field=first)
        rows = self._tensor_rows(columns, n) if self.tensor_only and not shared else None
        if rows is not None:
            request_id = request.get("id")
            return Item(d, rows, V2, request_id if isinstance(request_id, str) else None, outputs)
        rows = []
        for i in range(n):
            row = {**shared, **{k: self._cell(k, c[i]) for k, c in columns.items()}}
            try:
                rows.append(self.validate(row))
            except InputError as exc:   # name a field that came from `parameters` as the request spelled it
                if exc.field is not None and exc.field.split(".")[0] in shared:
                    exc.field = f"parameters.{exc.field}"
                    exc.message = exc.message.replace("`", "`parameters.", 1)
                raise
        request_id = request.get("id")
        return Item(d, rows, V2, request_id if isinstance(request_id, str) else None, outputs)

    def _tensor_rows(self, columns: dict[str, np.ndarray], n: int) -> list[Any] | None:
        """The rows of a request whose type holds only Tensor fields, every one of them sent: one check per column
        (its datatype and shape were checked by _batch_major, exactly as Tensor's validator would per row; what is
        left is finiteness) and rows built without validation. None when a column fails the check or a field is
        not sent: the per-row path then validates and names the row's problem as it always has. Measured on the
        no-op model's 784-float row: model_validate ~10 µs a row against ~1 µs to build one here."""
        assert self.request is not None
        if len(columns) != len(self.request.model_fields):
            return None
        for column in columns.values():
            if column.dtype.kind in "fc" and not np.isfinite(column).all():
                return None
        cls = self.request
        return [_built(cls, {k: c[i] for k, c in columns.items()}) for i in range(n)]

    def _cell(self, name: str, value: Any) -> Any:
        """One row's slice of a tensor column as its field wants it: a scalar (text decoded), a list, or the array
        itself for a Tensor field."""
        spec = self.inputs[name]
        if spec.shape == [-1]:
            value = value.item() if isinstance(value, np.generic) else value
            return self._text(name, value) if name in self.text_fields else value
        if value.size > MAX_SERIES:
            raise InputError(f"input `{name}` has {value.size} values in one row; at most {MAX_SERIES} (MAX_SERIES)",
                             field=name)
        if name in self.list_fields:
            items = value.tolist()
            return [self._text(name, v) for v in items] if spec.datatype == "BYTES" else items
        return value

    @staticmethod
    def _text(name: str, value: Any) -> Any:
        if not isinstance(value, bytes):
            return value
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"`{name}` must be UTF-8 text; given {len(value)} undecodable bytes", field=name) from None
        if len(text) > MAX_TEXT_CHARS:   # the task routes' cap on one text
            raise InputError(f"`{name}` must hold at most {MAX_TEXT_CHARS} characters (MAX_TEXT_CHARS); given "
                             f"{len(text)}", field=name)
        return text

    # encoding --------------------------------------------------------------------------------------------------
    def answer(self, item: Item, outputs: list[Any]) -> bytes:
        """The response body for one item from the model's outputs for its rows."""
        outs = [self.as_response(o) for o in outputs]
        if item.form == V2:
            return self.answer_v2(item, outs)
        head = {"model": self.name, "version": self.model.version}
        rows = [_dump(o) for o in outs]
        for i, row in enumerate(rows):
            bad = _nonfinite(row, "" if item.form == ONE else f"results[{i}]")
            if bad is not None:
                raise self.nonfinite(bad)
        if item.form == ONE:
            return dumps({**head, **rows[0]})
        return dumps({**head, "results": rows})

    def nonfinite(self, output: str) -> InferlineError:
        """The error for a NaN or infinity in an answer: JSON has no spelling for them (orjson would write null, a
        value the caller cannot tell from a missing one), and it is the model's fault, not the caller's: a 500
        `internal` naming the model and the output."""
        return InferlineError(f"model {self.name} returned a NaN or infinite value in output `{output}`")

    def as_response(self, output: Any) -> Any:
        if self.response is None or isinstance(output, self.response):
            return output
        return self.response.model_validate(output)

    def answer_v2(self, item: Item, outs: list[Any]) -> bytes:
        names = item.v2_outputs or list(self.outputs)
        arrays = {name: _stack(self.outputs[name], [_get(o, name) for o in outs]) for name in names}
        for name, array in arrays.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise self.nonfinite(name)
        return v2codec.encode_response(self.name, self.model.version, item.v2_id, arrays, names)


def _tensor_only(request: type[BaseModel] | None) -> bool:
    """True when every field of the request type is a plain Tensor field and the type adds no validation of its
    own (validators, private attributes, extra fields, aliases): its rows are then checked per column."""
    if request is None or not request.model_fields:
        return False
    decorators = request.__pydantic_decorators__
    if (decorators.validators or decorators.field_validators or decorators.root_validators
            or decorators.model_validators or request.__private_attributes__
            or request.model_config.get("extra") == "allow"):
        return False
    for info in request.model_fields.values():
        if info.alias or info.annotation is not np.ndarray or len(info.metadata) != 1 \
                or not isinstance(info.metadata[0], TensorType):
            return False
    return True


def _built(cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """An instance of a request type from values already checked (what model_construct does, for the case
    _tensor_only admits, at a fraction of its cost)."""
    row = cls.__new__(cls)
    object.__setattr__(row, "__dict__", values)
    object.__setattr__(row, "__pydantic_fields_set__", set(values))
    object.__setattr__(row, "__pydantic_extra__", None)
    object.__setattr__(row, "__pydantic_private__", None)
    return row


def _batch_major(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A v2 input with its batch dimension first. Refuses a datatype other than the declared one (Triton does
    too: a silent cast hides a client's bug) and any shape but the declared one: only the batch dimension and the
    declared -1 dimensions vary (a [1, 784] or [1, 56, 14, 1] tensor for a [-1, 28, 28, 1] input is refused, never
    reshaped). Two spellings of a batch stay accepted, as tritonclient sends them: a tensor without its batch
    dimension is one row, and [N, 1] for a one-value-per-row input ([-1]) is N rows."""
    given = datatype_of(array)
    if given != spec.datatype:
        raise MalformedInput(f"input `{spec.name}` has datatype {given}; model expects {spec.datatype}",
                             field=spec.name)
    if array.ndim == len(spec.shape) - 1 and array.ndim > 0:
        array = array[None]
    elif spec.shape == [-1] and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape[1:], array.shape[1:],
                                                                                      strict=True)):
        raise InputError(f"input `{spec.name}` must have shape {spec.shape} (-1: any size); given "
                         f"{list(array.shape)}", field=spec.name)
    return array


def _stack(spec: TensorSpec, values: list[Any]) -> np.ndarray:
    """One output tensor from every row's value of that field, rows first."""
    dtype = DTYPES[spec.datatype]
    try:
        if spec.datatype == "BYTES":
            return np.array(values, dtype=object)
        if len(values) == 1:   # one row: no copy beyond the dtype
            return np.asarray(values[0], dtype=dtype)[None]
        return np.stack([np.asarray(v, dtype=dtype) for v in values])
    except ValueError as exc:   # ragged rows (e.g. forecasts of different lengths in one v2 request)
        raise InferlineError(f"output `{spec.name}` rows do not stack into one tensor: {exc}") from None


def _nonfinite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in a dumped answer (dicts, lists, floats, numpy arrays), or None."""
    if isinstance(value, float | np.floating):
        return None if np.isfinite(value) else path
    if isinstance(value, np.ndarray):
        return path if value.dtype.kind in "fc" and not np.isfinite(value).all() else None
    if isinstance(value, dict):
        for key, v in value.items():
            found = _nonfinite(v, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _nonfinite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _get(output: Any, name: str) -> Any:
    return output[name] if isinstance(output, dict) else getattr(output, name)


def _dump(output: Any) -> Any:
    return output.model_dump() if isinstance(output, BaseModel) else output


def _is_str(annotation: Any) -> bool:
    return annotation is str or str in typing.get_args(annotation)
