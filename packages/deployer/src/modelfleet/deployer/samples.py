"""Sample models built from scikit-learn's bundled digits data (no download needed).

Used by `modelfleet quickstart`, the tests and the benchmarks, so all three
exercise the same real ONNX model.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def make_digits_onnx(path: Path, *, variant: int = 1, max_iter: int = 200) -> Path:
    """Train a LogisticRegression on the digits data and write it as ONNX.

    `variant` changes the regularisation so that two versions give different
    (but both sensible) probabilities, and different bytes.
    """
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target
    model = LogisticRegression(C=1.0 / variant, max_iter=max_iter)
    with warnings.catch_warnings():
        # lbfgs stops at max_iter on raw 0-16 pixels; the model is accurate anyway
        # and a quick, deterministic build matters more here than the last digit.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(x, y)
    onx = to_onnx(
        model,
        x[:1],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={id(model): {"zipmap": False}},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path


def digits_rows(n: int = 1) -> list[list[float]]:
    """`n` real rows of the digits data, as plain lists (a request body's `data`)."""
    from sklearn.datasets import load_digits

    data = load_digits().data[:n]
    return [[float(v) for v in row] for row in data]


def pad_onnx(source: Path, dest: Path, size: int, *, seed: int = 0) -> Path:
    """A copy of an ONNX model grown to about `size` bytes by an unused initializer (a bigger
    artifact that loads and answers like `source`; `seed` varies the bytes, hence the sha256)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    extra = max(0, size - source.stat().st_size) // 4
    pad = numpy_helper.from_array(np.random.default_rng(seed).random(extra, dtype=np.float32), name="modelfleet_padding")
    model.graph.initializer.append(pad)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest
