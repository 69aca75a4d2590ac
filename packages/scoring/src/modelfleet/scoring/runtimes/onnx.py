"""No-code ONNX models on onnxruntime; input/output schema from the model's own signature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..tensors import signature_schemas, to_feeds, zero_sample
from .base import ScoreInput, Signature, TensorSpec

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, "object"), shape)


class OnnxRuntime:
    """An ONNX model file served with onnxruntime (thread-safe `run`)."""

    platform = "onnxruntime_onnx"
    raw = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._session: Any = None
        self._signature = Signature()
        self._output_names: list[str] = []

    def load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Small models are fastest single-threaded; requests already run in parallel
        # across the thread pool, so more intra-op threads would only contend.
        opts.intra_op_num_threads = int(os.environ.get("MODELFLEET_ORT_THREADS", "1"))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # the arena keeps peak buffers for good; small models gain nothing from it
        # and a device with 256 MB wants the memory back
        opts.enable_cpu_mem_arena = os.environ.get("MODELFLEET_ORT_ARENA", "0") == "1"
        self._session = ort.InferenceSession(
            str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        inputs = [_spec(a) for a in self._session.get_inputs()]
        outputs = [_spec(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in outputs]
        self._signature = Signature(inputs=inputs, outputs=outputs)
        req, resp = signature_schemas(self._signature)
        self._signature.input_schema = req
        self._signature.output_schema = resp
        self._signature.input_example = req["example"]

    def signature(self) -> Signature:
        return self._signature

    def sample(self) -> ScoreInput | None:
        payload = zero_sample(self._signature.inputs)
        return ScoreInput(body=b"", decoded=payload, is_decoded=True)

    def predict(self, request: ScoreInput) -> Any:
        feeds = to_feeds(request.data(), self._signature.inputs)
        results = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results, strict=True))

    def predict_arrays(self, feeds: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
        """Run already-built input arrays (used by the benchmark's in-process ceiling)."""
        return list(self._session.run(self._output_names, feeds))

    def close(self) -> None:
        self._session = None
