"""Turn a no-code request (`{"data": ...}`) into named numpy arrays checked against a signature."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError
from .runtimes.base import Signature, TensorSpec


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d < 0 else str(d) for d in shape) + "]"


def to_feeds(payload: Any, inputs: list[TensorSpec]) -> dict[str, np.ndarray[Any, Any]]:
    """Validate the decoded body and build one array per model input (400 naming what is wrong)."""
    if type(payload) is not dict or "data" not in payload:
        raise InputError('request body must be an object with a "data" field, e.g. {"data": [[...]]}')
    data = payload["data"]
    if type(data) is dict:
        names = {spec.name for spec in inputs}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(
                f"unknown input {unknown[0]!r}; the model's inputs are {sorted(names)}"
            )
        feeds = {}
        for spec in inputs:
            if spec.name not in data:
                raise InputError(
                    f"missing input {spec.name!r}: expected {spec.dtype} with shape {shape_text(spec.shape)}"
                )
            feeds[spec.name] = to_array(data[spec.name], spec)
        return feeds
    if len(inputs) != 1:
        raise InputError(
            "this model has several inputs; send them by name: "
            + '{"data": {' + ", ".join(f'"{s.name}": ...' for s in inputs) + "}}"
        )
    spec = inputs[0]
    return {spec.name: to_array(data, spec)}


def to_array(value: Any, spec: TensorSpec) -> np.ndarray[Any, Any]:
    """One input as an array of the expected dtype and shape."""
    try:
        arr = np.asarray(value, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(
            f"input {spec.name!r}: expected {spec.dtype} values with shape "
            f"{shape_text(spec.shape)}; {_short(exc)}"
        ) from None
    expected = spec.shape
    if expected:
        # a single row for a model with a batch dimension: add the batch dimension
        if arr.ndim == len(expected) - 1 and expected[0] < 0:
            arr = arr.reshape((1, *arr.shape))
        if arr.ndim != len(expected) or any(
            want >= 0 and got != want for got, want in zip(arr.shape, expected, strict=True)
        ):
            raise InputError(
                f"input {spec.name!r}: expected shape {shape_text(expected)} ({spec.dtype}), "
                f"got {list(arr.shape)}"
            )
    return arr


def zero_sample(inputs: list[TensorSpec]) -> dict[str, Any]:
    """A warm-up request: zeros of each input's shape, dynamic dimensions set to 1."""
    data = {
        spec.name: np.zeros(tuple(1 if d < 0 else d for d in spec.shape), dtype=spec.dtype).tolist()
        for spec in inputs
    }
    if len(inputs) == 1:
        return {"data": data[inputs[0].name]}
    return {"data": data}


def tensor_json_schema(spec: TensorSpec, *, example_rows: bool = False) -> dict[str, Any]:
    """A JSON Schema (OpenAPI 3.0 dialect) of a tensor as nested arrays."""
    kind = spec.dtype
    leaf: dict[str, Any]
    if kind.startswith("float"):
        leaf = {"type": "number", "format": "float" if kind != "float64" else "double"}
    elif kind.startswith(("int", "uint")):
        leaf = {"type": "integer", "format": "int64" if kind.endswith("64") else "int32"}
    elif kind == "bool":
        leaf = {"type": "boolean"}
    elif kind == "str":
        leaf = {"type": "string"}
    else:
        leaf = {}
    schema = leaf
    for dim in reversed(spec.shape):
        schema = {"type": "array", "items": schema}
        if dim >= 0:
            schema["minItems"] = dim
            schema["maxItems"] = dim
    return schema


def signature_schemas(sig: Signature) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request and response JSON Schemas of a no-code model."""
    if len(sig.inputs) == 1:
        data_schema = tensor_json_schema(sig.inputs[0])
    else:
        data_schema = {
            "type": "object",
            "properties": {s.name: tensor_json_schema(s) for s in sig.inputs},
            "required": [s.name for s in sig.inputs],
        }
    request = {
        "type": "object",
        "properties": {"data": data_schema},
        "required": ["data"],
        "example": zero_sample(sig.inputs),
    }
    response = {
        "type": "object",
        "properties": {s.name: tensor_json_schema(s) for s in sig.outputs},
    }
    return request, response


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


_FROM_V2 = {
    "FP32": "float32", "FP64": "float64", "FP16": "float16", "INT8": "int8", "INT16": "int16",
    "INT32": "int32", "INT64": "int64", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "BOOL": "bool", "BYTES": "str",
}


def v2_request_to_payload(body: Any, inputs: list[TensorSpec]) -> dict[str, Any]:
    """An Open Inference Protocol v2 request as the `{"data": {name: array}}` payload."""
    if type(body) is not dict or type(body.get("inputs")) is not list or not body["inputs"]:
        raise InputError('request body must be an object with a non-empty "inputs" list')
    specs = {s.name: s for s in inputs}
    data: dict[str, Any] = {}
    for i, item in enumerate(body["inputs"]):
        if type(item) is not dict:
            raise InputError(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = item.get("name")
        if name not in specs:
            raise InputError(f"inputs[{i}]: unknown input {name!r}; the model's inputs are {sorted(specs)}")
        spec = specs[name]
        shape = item.get("shape")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise InputError(f"input {name!r}: shape must be a list of non-negative integers")
        datatype = item.get("datatype")
        if datatype != spec.v2_datatype:
            raise InputError(f"input {name!r}: datatype must be {spec.v2_datatype}, got {datatype!r}")
        try:
            arr = np.asarray(item.get("data"), dtype=_FROM_V2[datatype]).reshape(shape)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InputError(f"input {name!r}: data does not fit shape {shape} of {datatype}: {_short(exc)}") from None
        data[name] = arr
    return {"data": data}


def v2_response(
    name: str, version: str, result: Any, outputs: list[TensorSpec], request_id: Any = None
) -> dict[str, Any]:
    """Named output arrays as an Open Inference Protocol v2 response (data flattened)."""
    specs = {s.name: s for s in outputs}
    body: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": []}
    if request_id is not None:
        body["id"] = request_id
    for out_name, value in result.items():
        arr = np.asarray(value)
        spec = specs.get(out_name)
        body["outputs"].append({
            "name": out_name,
            "shape": list(arr.shape),
            "datatype": spec.v2_datatype if spec else "BYTES",
            "data": arr.reshape(-1),
        })
    return body
