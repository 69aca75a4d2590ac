"""Azure ML style entry scripts over real HTTP: plain run(), inference-schema, raw requests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelfleet.scoring import ModelSpec

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


@pytest.fixture
def model_dir(tmp_path: Path, digits_onnx: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(digits_onnx, folder / "model.onnx")
    return folder


def test_schema_script_converts_input_and_reports_schema(start_server, model_dir, digits_rows) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(model_dir, SCRIPTS / "score_schema.py", name="digits", version="3"))
    with server.client() as c:
        r = c.post("/score", json={"data": digits_rows[:4]})
        assert r.status_code == 200, r.text
        assert r.json() == {"label": [0, 1, 2, 3]}
        doc = c.get("/swagger.json").json()
    schema = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["data"]["type"] == "array"
    assert server.host.active is not None and server.host.active.warmup_s is not None


def test_schema_script_bad_input_is_400_naming_the_field(start_server, model_dir) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(model_dir, SCRIPTS / "score_schema.py"))
    with server.client() as c:
        r = c.post("/score", json={"rows": [[0] * 64]})
        assert r.status_code == 400
        assert r.json()["error"] == "unknown field 'rows'; run() takes ['data']"
        r = c.post("/score", json={"data": [["x"] * 64]})
        assert r.status_code == 400
        assert "input does not match run()'s input schema" in r.json()["error"]
        assert "field 'data' expects an array of an array of number (float)" in r.json()["error"]
        r = c.post("/score", json={"data": [[0.0] * 3]})
        assert r.status_code == 400
        assert "field 'data' expects" in r.json()["error"]
        assert "array has size 3 on dimension #1, while expected value is 64" in r.json()["error"]
        r = c.post("/score", json=[[0.0] * 64])
        assert r.status_code == 400
        assert r.json()["error"] == "request body must be a JSON object whose fields are run()'s parameters"
        assert c.get("/v2/health/ready").status_code == 200


def test_run_that_raises_gets_500_and_server_keeps_serving(start_server, model_dir, digits_rows) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(model_dir, SCRIPTS / "score_schema.py"))
    bad = [[-1.0] * 64]
    with server.client() as c:
        r = c.post("/score", json={"data": bad})
        assert r.status_code == 500
        body = r.json()
        assert body["error"] == "run() raised RuntimeError: negative pixel"
        assert r.headers["x-ms-run-function-failed"] == "True"
        assert body["request_id"] == r.headers["x-request-id"]
        assert c.post("/score", json={"data": digits_rows[:1]}).json() == {"label": [0]}


def test_plain_script_gets_the_body_as_text(start_server, model_dir, digits_rows) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(model_dir, SCRIPTS / "score_plain.py"))
    with server.client() as c:
        r = c.post("/score", json={"data": digits_rows[:2]})
        assert r.status_code == 200
        assert r.json() == [0, 1]
        r = c.post("/score", json={"data": [[0.0] * 64]})
        assert len(r.json()) == 1
        assert r.headers["content-type"] == "application/json"
        r = c.post("/score", json={"data": []})
        assert r.status_code == 500
        assert r.json()["error"] == "run() raised ValueError: no rows given"
        r = c.post("/score", content=b"{not json")
        assert r.status_code == 400
        assert "malformed JSON body" in r.json()["error"]
        r = c.post("/score", content=b"\xff\xfe", headers={"content-type": "text/plain"})
        assert r.status_code == 400
        assert r.json()["error"] == "request body is not UTF-8 text"


def test_odd_run_results_never_stop_the_server(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(tmp_path, SCRIPTS / "score_odd.py"))
    with server.client() as c:
        for _ in range(1000):  # until the fast run() has moved inline
            assert c.post("/score", json={"kind": "string"}).json() == "plain string"
            if server.host.active.inline:
                break
        assert server.host.active.inline
        r = c.post("/score", json={"kind": "exit"})
        assert r.status_code == 500
        assert r.json()["error"] == "run() raised SystemExit: 3"
        r = c.post("/score", json={"kind": "object"})
        assert r.status_code == 500
        assert "run() returned a value that cannot be serialised" in r.json()["error"]
        r = c.post("/score", json={"kind": "numpy"})
        assert r.json() == {"scalar": 1.5, "array": [0, 1, 2], "frame": [{"a": 1}, {"a": 2}]}
        assert c.get("/v2/health/ready").status_code == 200


def test_v2_infer_needs_a_tensor_signature(start_server, model_dir) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(model_dir, SCRIPTS / "score_plain.py", name="digits"))
    with server.client() as c:
        r = c.post("/v2/models/digits/infer", json={"inputs": []})
        assert r.status_code == 400
        assert r.json()["error"] == "this model has no tensor signature (an entry script); use POST /score"
