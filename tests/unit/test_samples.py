from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelfleet.deployer.samples import digits_rows


def test_digits_models_predict_real_digits(digits_onnx: Path, digits_onnx_v2: Path) -> None:
    rows = np.array(digits_rows(5), dtype=np.float32)
    for path in (digits_onnx, digits_onnx_v2):
        labels, probs = ort.InferenceSession(str(path)).run(None, {"X": rows})
        assert list(labels) == [0, 1, 2, 3, 4]
        assert probs.shape == (5, 10)
    assert digits_onnx.read_bytes() != digits_onnx_v2.read_bytes()
