"""No-code ONNX serving over real HTTP: the digits model, bad input, health and metadata."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from modelfleet.scoring import ModelSpec


@pytest.fixture
def digits_server(start_server, digits_onnx: Path):  # type: ignore[no-untyped-def]
    return start_server(ModelSpec(digits_onnx.parent, name="digits", version="1"))


def expected(model: Path, rows: list[list[float]]) -> tuple[list[int], np.ndarray]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probs = sess.run(None, {"X": np.asarray(rows, dtype=np.float32)})
    return [int(x) for x in label], probs


def test_score_json_matches_onnxruntime(digits_server, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r = c.post("/score", json={"data": digits_rows})
    assert r.status_code == 200, r.text
    body = r.json()
    labels, probs = expected(digits_onnx, digits_rows)
    assert body["label"] == labels == [0, 1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(body["probabilities"], probs, rtol=1e-5)
    assert r.headers["x-model-version"] == "1"
    assert r.headers["x-request-id"]


def test_score_msgpack_round_trip(digits_server, digits_rows) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r = c.post(
            "/score",
            content=msgpack.packb({"data": digits_rows[:2]}),
            headers={"content-type": "application/msgpack"},
        )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(r.content)["label"] == [0, 1]


def test_single_row_without_batch_dimension(digits_server, digits_rows) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r = c.post("/score", json={"data": digits_rows[3]})
    assert r.status_code == 200
    assert r.json()["label"] == [3]


def test_request_id_is_echoed(digits_server, digits_rows) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r1 = c.post("/score", json={"data": digits_rows[:1]}, headers={"x-request-id": "abc-123"})
        r2 = c.post("/score", json={"data": digits_rows[:1]}, headers={"x-ms-client-request-id": "ms-9"})
        r3 = c.get("/v2/health/live")
        r4 = c.post("/score", json={"data": digits_rows[:1]}, headers={"x-ms-request-id": "ms-4"})
        r5 = c.get("/v2/health/live", headers={"x-request-id": "x" * 201})
    assert r4.headers["x-request-id"] == r4.headers["x-ms-request-id"] == "ms-4"
    # an absurdly long client id is replaced, not echoed
    assert r5.headers["x-request-id"] != "x" * 201 and len(r5.headers["x-request-id"]) < 40
    assert r1.headers["x-request-id"] == "abc-123"
    assert r2.headers["x-request-id"] == "ms-9"
    assert r2.headers["x-ms-request-id"] == "ms-9"
    assert r3.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"data": [[1, 2', "application/json", "malformed JSON body"),
        (b"\xc1\x00", "application/msgpack", "malformed MessagePack body"),
        (b'{"rows": []}', "application/json", 'must be an object with a "data" field'),
        (b'{"data": [[1, 2, 3]]}', "application/json", "input 'X': expected shape [N, 64] (float32), got [1, 3]"),
        (b'{"data": [["a"]]}', "application/json", "input 'X': expected float32 values with shape [N, 64]"),
        (b'{"data": {"Y": [[1]]}}', "application/json", "unknown input 'Y'; the model's inputs are ['X']"),
        (b"", "application/json", "empty request body"),
    ],
)
def test_bad_input_gets_400_naming_the_problem(digits_server, body, content_type, message) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r = c.post("/score", content=body, headers={"content-type": content_type})
        assert r.status_code == 400
        assert message in r.json()["error"]
        assert r.json()["request_id"] == r.headers["x-request-id"]
        # the server keeps serving after bad input
        assert c.get("/v2/health/ready").status_code == 200


def test_health_and_metadata(digits_server) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        assert c.get("/").status_code == 200
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2/models/digits").json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
        assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
        unknown = c.get("/v2/models/other")
        assert unknown.status_code == 404
        assert "unknown model 'other'" in unknown.json()["error"]


def test_not_ready_without_a_model(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(None)
    with server.client() as c:
        assert c.get("/").status_code == 503
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/health/live").status_code == 200
        r = c.post("/score", json={"data": [[0] * 64]})
        assert r.status_code == 503
        assert r.json()["error"] == "no model loaded yet"


def test_unknown_endpoint_and_wrong_method(digits_server) -> None:  # type: ignore[no-untyped-def]
    with digits_server.client() as c:
        r = c.get("/nope")
        assert r.status_code == 404
        assert "no such endpoint: GET /nope" in r.json()["error"]
        r = c.put("/score", content=b"{}")
        assert r.status_code == 405
        assert r.headers["allow"] == "POST"
        assert r.json()["error"] == "method PUT not allowed on /score; use POST"
        r = c.post("/metrics")
        assert (r.status_code, r.headers["allow"]) == (405, "GET")
        assert r.json()["error"] == "method POST not allowed on /metrics; use GET"


def test_serve_cli_no_code_onnx(serve_process, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    import httpx

    proc, url = serve_process("--model-dir", str(digits_onnx.parent), "--model-name", "digits")
    r = httpx.post(url + "/score", json={"data": digits_rows[:3]})
    assert r.status_code == 200
    assert r.json()["label"] == [0, 1, 2]
    assert httpx.get(url + "/v2/models/digits").status_code == 200
    proc.terminate()  # SIGTERM: drain, stop, exit 0
    assert proc.wait(10) == 0


def test_open_inference_protocol_v2_infer(digits_server, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    flat = [v for row in digits_rows[:2] for v in row]
    request = {"id": "req-1", "inputs": [{"name": "X", "shape": [2, 64], "datatype": "FP32", "data": flat}]}
    with digits_server.client() as c:
        r = c.post("/v2/models/digits/infer", json=request)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("digits", "1", "req-1")
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["label"] == {"name": "label", "shape": [2], "datatype": "INT64", "data": [0, 1]}
        assert outputs["probabilities"]["shape"] == [2, 10]
        _, probs = expected(digits_onnx, digits_rows[:2])
        np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (2, 10)), probs, rtol=1e-5)
        assert c.post("/v2/models/digits/versions/1/infer", json=request).status_code == 200

        cases = [
            ({"inputs": []}, 'request body must be an object with a non-empty "inputs" list'),
            ({"inputs": [["X"]]}, "inputs[0] must be an object with name, shape, datatype and data"),
            ({"inputs": [{**request["inputs"][0], "shape": [2, -64]}]}, "input 'X': shape must be a list of non-negative integers"),
            ({"inputs": [{**request["inputs"][0], "datatype": "INT64"}]}, "input 'X': datatype must be FP32, got 'INT64'"),
            ({"inputs": [{**request["inputs"][0], "name": "Y"}]}, "inputs[0]: unknown input 'Y'"),
            ({"inputs": [{**request["inputs"][0], "shape": [3, 64]}]}, "input 'X': data does not fit shape [3, 64] of FP32"),
            ({"inputs": [{**request["inputs"][0], "shape": [2, 32, 2], "data": flat}]}, "input 'X': expected shape [N, 64] (float32), got [2, 32, 2]"),
        ]
        for bad, message in cases:
            r = c.post("/v2/models/digits/infer", json=bad)
            assert r.status_code == 400, bad
            assert message in r.json()["error"]
        assert c.post("/v2/models/other/infer", json=request).status_code == 404
        assert c.post("/v2/models/digits/versions/9/infer", json=request).status_code == 404
