"""The model runtime plug-in interface: the server never knows which framework it runs."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a model: numpy dtype name and shape (-1 = any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def v2_datatype(self) -> str:
        """The Open Inference Protocol v2 datatype name."""
        return _V2_TYPES.get(self.dtype, "BYTES")


_V2_TYPES = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
}


@dataclass
class Signature:
    """What a model takes and gives; `input_schema`/`output_schema` are JSON Schemas of the body."""

    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    input_example: Any = None


@dataclass
class ScoreInput:
    """One scoring request as a runtime sees it."""

    body: bytes
    content_type: str = "application/json"
    method: str = "POST"
    path: str = "/score"
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    decoded: Any = None
    is_decoded: bool = False

    def data(self) -> Any:
        """The body decoded from JSON or MessagePack (400 naming the problem when malformed)."""
        if not self.is_decoded:
            self.decoded = decode_body(self.body, self.content_type)
            self.is_decoded = True
        return self.decoded


def is_msgpack(content_type: str) -> bool:
    return "msgpack" in content_type


def decode_body(body: bytes, content_type: str) -> Any:
    """Decode a JSON or MessagePack request body."""
    if is_msgpack(content_type):
        import msgpack

        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            raise InputError(f"malformed MessagePack body: {exc}") from None
    import orjson

    if not body:
        raise InputError("empty request body: expected JSON such as {\"data\": [...]}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"malformed JSON body: {exc}") from None


@dataclass
class RawResponse:
    """A full HTTP response produced by a raw-mode entry script."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


class ModelRuntime(Protocol):
    """A loaded model: `load()` once, then `predict()` per request (maybe from several threads)."""

    platform: str
    #: True when the runtime wants the HTTP request itself (raw mode): never decoded by the server.
    raw: bool

    def load(self) -> None:
        """Load the model (and run the entry script's init()); raise on failure."""

    def signature(self) -> Signature:
        """Inputs/outputs and JSON schemas, for validation, OpenAPI and v2 metadata."""

    def sample(self) -> ScoreInput | None:
        """A request that exercises the model during warm-up, or None when there is none."""

    def predict(self, request: ScoreInput) -> Any:
        """Score one request: a JSON-serialisable value or a RawResponse."""

    def close(self) -> None:
        """Release the model's resources (called once no request uses it any more)."""


#: file suffix -> the runtime serving such a file with no code ("module:Class",
#: imported only when used, so a device without TFLite never loads it)
NO_CODE_RUNTIMES: dict[str, str] = {
    ".onnx": "modelfleet.scoring.runtimes.onnx:OnnxRuntime",
    ".tflite": "modelfleet.scoring.runtimes.tflite:TfliteRuntime",
}
ENTRY_SCRIPT_RUNTIME = "modelfleet.scoring.runtimes.entry_script:EntryScriptRuntime"


def runtime_class(ref: str) -> Any:
    """Import a runtime class named "module:Class"."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
