"""No-code TFLite serving over real HTTP with the committed dense.tflite fixture."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from modelfleet.scoring import ModelSpec

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "dense.tflite"
WEIGHTS = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 0.5]], dtype=np.float32)
BIAS = np.array([0.5, -1.0], dtype=np.float32)


@pytest.fixture
def tflite_dir(tmp_path: Path) -> Path:
    shutil.copy(FIXTURE, tmp_path / "dense.tflite")
    return tmp_path


def test_fixture_matches_its_generator() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tflite", FIXTURE.parent / "make_tflite.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == FIXTURE.read_bytes()


def test_tflite_scores_batches_and_reports_signature(start_server, tflite_dir) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(tflite_dir, name="dense"))
    x = [[1, 1, 1, 1], [0, 1, 0, 2], [3, -1, 0.5, 0]]
    with server.client() as c:
        r = c.post("/score", json={"data": x})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["y"], np.asarray(x, np.float32) @ WEIGHTS.T + BIAS, rtol=1e-6)
        r1 = c.post("/score", json={"data": [x[0]]})
        assert r1.json()["y"] == [[10.5, -0.5]]
        meta = c.get("/v2/models/dense").json()
        assert meta["platform"] == "tflite"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        bad = c.post("/score", json={"data": [[1, 2, 3]]})
        assert bad.status_code == 400
        assert bad.json()["error"] == "input 'x': expected shape [N, 4] (float32), got [1, 3]"


def test_tflite_concurrent_requests_from_the_pool_are_not_mixed_up(start_server, tflite_dir) -> None:  # type: ignore[no-untyped-def]
    # inline threshold 0: every request goes through the thread pool, several interpreters at once
    server = start_server(ModelSpec(tflite_dir), inline_threshold_ms=0, max_concurrent_requests=4)
    assert server.host.active is not None and not server.host.active.inline

    def call(i: int) -> tuple[int, list[list[float]]]:
        with server.client() as c:
            rows = [[float(i), 1.0, 0.0, 0.0]] * (1 + i % 3)
            return i, c.post("/score", json={"data": rows}).json()["y"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(80)))
    for i, y in results:
        expected = (np.asarray([[i, 1.0, 0.0, 0.0]] * (1 + i % 3), np.float32) @ WEIGHTS.T + BIAS).tolist()
        assert y == expected
