"""Raw-request scripts, OpenAPI documents, metrics and pandas/standard schemas over real HTTP."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import msgpack
import pytest
from openapi_spec_validator import validate

from modelfleet.scoring import ModelSpec

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scoring"
SCRIPTS = FIXTURES / "scripts"


def test_raw_mode_script_gets_the_request_and_returns_a_full_response(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(tmp_path, SCRIPTS / "score_raw.py"))
    assert server.host.active.runtime.raw
    image = bytes(range(256)) * 40
    with server.client() as c:
        r = c.post("/score?scale=2", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 201
        assert r.content == image[::-1]
        assert r.headers["x-digest"] == hashlib.sha256(image).hexdigest()
        assert r.headers["x-scale"] == "2"
        assert r.headers["content-type"] == "application/octet-stream"
        g = c.get("/score")
        assert g.status_code == 200 and g.json() == {"hint": "POST an image"}
        # a header built from the query string cannot smuggle a second header in
        split = c.post("/score?scale=1%0d%0aSet-Cookie:%20evil=1", content=b"abc")
        assert split.status_code == 500
        assert "set-cookie" not in split.headers
        assert split.json()["error"] == "run() returned an invalid response header 'X-Scale': '1\\r\\nSet-Cookie: evil=1'"
        empty = c.post("/score", content=b"")
        assert empty.status_code == 400 and empty.text == "empty body"
        doc = c.get("/swagger.json").json()
    validate(doc)
    assert "application/octet-stream" in doc["paths"]["/score"]["post"]["requestBody"]["content"]


def test_pandas_and_standard_schemas(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(tmp_path, SCRIPTS / "score_pandas.py", name="area", version="7"))
    with server.client() as c:
        rows = [{"width": 2.0, "height": 5.0, "name": "x"}, {"width": 1.0, "height": 1.0, "name": "y"}]
        r = c.post("/score", json={"data": rows, "scale": 10.0})
        assert r.status_code == 200, r.text
        assert r.json() == [100.0, 10.0]
        packed = c.post(
            "/score",
            content=msgpack.packb({"data": rows, "scale": 1.0}),
            headers={"content-type": "application/msgpack"},
        )
        assert msgpack.unpackb(packed.content) == [10.0, 1.0]
        missing = c.post("/score", json={"scale": 2.0})
        assert missing.status_code == 400
        assert missing.json()["error"].startswith("missing field 'data': expected an array of object")
        # the field named is the one whose conversion failed, not the first declared
        wrong = c.post("/score", json={"data": rows, "scale": "big"})
        assert wrong.status_code == 400
        assert "field 'scale' expects number (double)" in wrong.json()["error"]
        doc = c.get("/swagger.json").json()
    validate(doc)
    props = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(props) == {"data", "scale"}


@pytest.mark.parametrize("kind", ["onnx", "tflite", "schema-script", "plain-script"])
def test_swagger_is_valid_openapi_3(start_server, tmp_path, digits_onnx, kind) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(digits_onnx, tmp_path / "model.onnx")
    if kind == "onnx":
        spec = ModelSpec(tmp_path)
    elif kind == "tflite":
        folder = tmp_path / "t"
        folder.mkdir()
        shutil.copy(FIXTURES / "dense.tflite", folder)
        spec = ModelSpec(folder)
    elif kind == "schema-script":
        spec = ModelSpec(tmp_path, SCRIPTS / "score_schema.py")
    else:
        spec = ModelSpec(tmp_path, SCRIPTS / "score_plain.py")
    server = start_server(spec, keys_file=None)
    with server.client() as c:
        doc = c.get("/swagger.json").json()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    if kind in {"onnx", "tflite"}:
        schema = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["data"]
        assert schema["example"]["data"]


def test_metrics_count_requests_errors_latency_and_version(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent, name="digits", version="5"))
    with server.client() as c:
        for _ in range(3):
            c.post("/score", json={"data": [[0] * 64]})
        c.post("/score", json={"data": [[0] * 3]})
        text = c.get("/metrics").text
    assert 'modelfleet_score_requests_total{code="200"} 3' in text
    assert 'modelfleet_score_requests_total{code="400"} 1' in text
    assert 'modelfleet_score_latency_seconds_bucket{le="+Inf"} 4' in text
    assert "modelfleet_score_latency_seconds_count 4" in text
    assert 'modelfleet_active_model{name="digits",version="5"} 1' in text
    snap = server.server.metrics.snapshot()
    assert snap["requests"] == 4 and snap["model_version"] == "5"
    from prometheus_client.parser import text_string_to_metric_families  # type: ignore[import-not-found]

    families = {f.name for f in text_string_to_metric_families(text)}
    assert "modelfleet_score_latency_seconds" in families
