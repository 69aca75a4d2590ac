"""No-code TFLite models: tflite-runtime, or ai-edge-litert where that is what imports.

Interpreters are not thread-safe, so each thread that scores gets its own
(about 80 KB each) built from the same model bytes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..tensors import signature_schemas, to_feeds, zero_sample
from .base import ScoreInput, Signature, TensorSpec


def interpreter_class() -> Any:
    """The TFLite Interpreter class of whichever runtime is installed."""
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        raise ModelLoadError(
            "load",
            "no TFLite runtime installed: pip install tflite-runtime (NumPy<2) or ai-edge-litert",
        ) from None


def _specs(details: list[dict[str, Any]]) -> list[TensorSpec]:
    specs = []
    for d in details:
        shape_sig = d.get("shape_signature")
        shape = shape_sig if shape_sig is not None and len(shape_sig) else d["shape"]
        specs.append(
            TensorSpec(d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in shape))
        )
    return specs


class TfliteRuntime:
    """A `.tflite` file; one interpreter per scoring thread."""

    platform = "tflite"
    raw = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._content = b""
        self._local = threading.local()
        self._signature = Signature()
        self._in_index: list[int] = []
        self._out_index: list[int] = []

    def _interpreter(self) -> Any:
        interp = getattr(self._local, "interp", None)
        if interp is None:
            interp = interpreter_class()(model_content=self._content, num_threads=1)
            interp.allocate_tensors()
            self._local.interp = interp
        return interp

    def load(self) -> None:
        self._content = self.path.read_bytes()
        interp = self._interpreter()
        ins = interp.get_input_details()
        outs = interp.get_output_details()
        self._in_index = [d["index"] for d in ins]
        self._out_index = [d["index"] for d in outs]
        self._signature = Signature(inputs=_specs(ins), outputs=_specs(outs))
        req, resp = signature_schemas(self._signature)
        self._signature.input_schema = req
        self._signature.output_schema = resp
        self._signature.input_example = req["example"]

    def signature(self) -> Signature:
        return self._signature

    def sample(self) -> ScoreInput | None:
        return ScoreInput(body=b"", decoded=zero_sample(self._signature.inputs), is_decoded=True)

    def predict(self, request: ScoreInput) -> Any:
        feeds = to_feeds(request.data(), self._signature.inputs)
        interp = self._interpreter()
        shapes: dict[int, tuple[int, ...]] = self._local.__dict__.setdefault("shapes", {})
        resized = False
        for spec, index in zip(self._signature.inputs, self._in_index, strict=True):
            shape = feeds[spec.name].shape
            if shapes.get(index) != shape:
                interp.resize_tensor_input(index, shape)
                shapes[index] = shape
                resized = True
        if resized:
            interp.allocate_tensors()
        for spec, index in zip(self._signature.inputs, self._in_index, strict=True):
            interp.set_tensor(index, feeds[spec.name])
        interp.invoke()
        return {
            spec.name: interp.get_tensor(index)
            for spec, index in zip(self._signature.outputs, self._out_index, strict=True)
        }

    def close(self) -> None:
        self._local = threading.local()
        self._content = b""
