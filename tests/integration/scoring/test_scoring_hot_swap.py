"""Hot-swap through ModelHost and the admin HTTP endpoint: no request fails, each sees one version."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from modelfleet.scoring import ModelHost, ModelLoadError, ModelSpec
from modelfleet.scoring.runtimes.base import ScoreInput

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


def _probs(model: Path, rows: list[list[float]]) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"X": np.asarray(rows, np.float32)})[0]


def test_concurrent_requests_through_swaps_never_fail(start_server, digits_onnx, digits_onnx_v2, digits_rows) -> None:  # type: ignore[no-untyped-def]
    rows = digits_rows[:2]
    expected = {"1": _probs(digits_onnx, rows), "2": _probs(digits_onnx_v2, rows)}
    assert not np.allclose(expected["1"], expected["2"], rtol=1e-3)
    v1 = ModelSpec(digits_onnx.parent, name="digits", version="1")
    v2 = ModelSpec(digits_onnx_v2.parent, name="digits", version="2")
    server = start_server(v1)
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {"1": 0, "2": 0}
    lock = threading.Lock()

    def fire() -> None:
        with server.client() as c:
            while not stop.is_set():
                r = c.post("/score", json={"data": rows})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                probs = np.asarray(r.json()["probabilities"])
                matches = [v for v, p in expected.items() if np.allclose(probs, p, rtol=1e-5)]
                if matches != [r.headers["x-model-version"]]:
                    failures.append(f"response matches {matches}, header says {r.headers['x-model-version']}")
                with lock:
                    seen[matches[0] if matches else "?"] = seen.get(matches[0] if matches else "?", 0) + 1

    threads = [threading.Thread(target=fire) for _ in range(6)]
    for t in threads:
        t.start()
    old_versions = []

    def wait_for_traffic(version: str) -> None:
        with lock:
            target = seen[version] + 20
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if seen[version] >= target:
                    return
            time.sleep(0.005)
        raise AssertionError(f"version {version} served no traffic")

    try:
        wait_for_traffic("1")
        for i in range(6):
            old = server.host.active
            spec = v2 if i % 2 == 0 else v1
            server.host.load(spec)
            old_versions.append(old)
            wait_for_traffic(spec.version)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert seen["1"] > 0 and seen["2"] > 0
    # every retired version was released once its requests finished
    assert all(m.closed for m in old_versions)
    assert server.host.active.version == "1"
    assert server.server.metrics.swaps == 6


def test_failed_load_keeps_the_old_version_serving(start_server, digits_onnx, tmp_path, digits_rows) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent, name="digits", version="1"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError) as info:
        server.host.load(ModelSpec(corrupt, name="digits", version="2"))
    assert info.value.stage == "load"
    assert "InvalidProtobuf" in info.value.reason or "protobuf" in info.value.reason.lower()

    with pytest.raises(ModelLoadError) as info:
        server.host.load(ModelSpec(tmp_path, SCRIPTS / "score_bad_warmup.py", version="3"))
    assert info.value.stage == "warmup"
    assert "this model is broken" in info.value.reason

    with pytest.raises(ModelLoadError) as info:
        server.host.load(ModelSpec(tmp_path, SCRIPTS / "score_bad_init.py", version="4"))
    assert info.value.stage == "load"
    assert info.value.reason == "init() raised FileNotFoundError: model.pkl not found in the model directory"

    with pytest.raises(ModelLoadError) as info:
        server.host.load(ModelSpec(tmp_path / "missing", name="digits", version="5"))
    assert "model directory not found" in info.value.reason

    assert server.host.active.version == "1"
    with server.client() as c:
        r = c.post("/score", json={"data": digits_rows[:1]})
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    assert server.server.metrics.load_failures == 4


def test_admin_endpoint_swaps_and_refuses(start_server, digits_onnx, digits_onnx_v2, tmp_path, digits_rows) -> None:  # type: ignore[no-untyped-def]
    admin = tmp_path / "admin.key"
    admin.write_text("s3cret-admin\n")
    server = start_server(ModelSpec(digits_onnx.parent, name="digits", version="1"), admin_key_file=admin)
    auth = {"authorization": "Bearer s3cret-admin"}
    with server.client() as c:
        body = {"model_dir": str(digits_onnx_v2.parent), "entry_script": None, "version": "2"}
        r = c.post("/v2/repository/models/digits/load", json=body)
        assert r.status_code == 401
        assert "admin key" in r.json()["error"]
        r = c.post("/v2/repository/models/digits/load", json=body, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "digits", "version": "2"}
        assert c.post("/score", json={"data": digits_rows[:1]}).headers["x-model-version"] == "2"

        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "model.onnx").write_bytes(b"garbage")
        r = c.post("/v2/repository/models/digits/load", json={"model_dir": str(bad), "version": "3"}, headers=auth)
        assert r.status_code == 422
        assert r.json()["stage"] == "load"
        r = c.post("/v2/repository/models/digits/load", json={"version": "3"}, headers=auth)
        assert r.status_code == 400
        assert r.json()["error"] == 'field "model_dir" is required (a path as the server sees it)'
        r = c.post("/v2/repository/models/digits/load", content=b"{oops", headers=auth)
        assert r.status_code == 400
        assert "malformed JSON body" in r.json()["error"]
        for field, value, message in [
            ("entry_script", 3, 'field "entry_script" must be a string or null'),
            ("version", True, 'field "version" must be a string'),
        ]:
            r = c.post("/v2/repository/models/digits/load", json={**body, field: value}, headers=auth)
            assert r.status_code == 400
            assert r.json()["error"] == message
        assert c.get("/v2/models/digits").json()["versions"] == ["2"]


def test_admin_endpoint_is_disabled_without_admin_key(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent))
    r = httpx.post(server.url + "/v2/repository/models/model/load", json={"model_dir": "/x"})
    assert r.status_code == 404
    assert "--admin-key-file" in r.json()["error"]


def test_aload_from_async_code(digits_onnx, digits_onnx_v2) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        host = ModelHost()
        await host.aload(ModelSpec(digits_onnx.parent, version="1"))
        first = host.active
        await host.aload(ModelSpec(digits_onnx_v2.parent, version="2"))
        assert host.active is not None and host.active.version == "2"
        assert first is not None and first.closed
        host.unload()
        assert not host.ready

    asyncio.run(scenario())


def test_entry_script_with_model_dir_relative_lookup(start_server, tmp_path, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(digits_onnx, bundle / "model.onnx")
    shutil.copy(SCRIPTS / "score_plain.py", bundle / "score.py")
    server = start_server(ModelSpec(bundle, "score.py"))
    r = httpx.post(server.url + "/score", json={"data": digits_rows[:2]})
    assert r.json() == [0, 1]


def test_swapped_script_versions_use_their_own_helper_modules(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundles = []
    for version in ("1", "2"):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        (folder / "mf_test_helper.py").write_text(f"VERSION = {version!r}\n")
        (folder / "score.py").write_text(
            "import mf_test_helper\n\ndef init():\n    pass\n\n"
            "def run(data):\n    return {'helper': mf_test_helper.VERSION}\n"
        )
        bundles.append(folder)
    server = start_server(ModelSpec(bundles[0], "score.py", version="1"))
    with server.client() as c:
        assert c.post("/score", json={}).json() == {"helper": "1"}
        server.host.load(ModelSpec(bundles[1], "score.py", version="2"))
        assert c.post("/score", json={}).json() == {"helper": "2"}
        server.host.load(ModelSpec(bundles[0], "score.py", version="3"))
        assert c.post("/score", json={}).json() == {"helper": "1"}


def test_swagger_follows_swaps_made_through_the_python_api(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    # The agent swaps with host.load(), not over HTTP. A retired version's memory is
    # reused by later ones, so a document cached by object address went stale: swap
    # until a new version sits where the cached one was, then ask again.
    server = start_server(ModelSpec(digits_onnx.parent, name="digits", version="0"))
    version = 0
    with server.client() as c:
        for _ in range(30):
            assert c.get("/swagger.json").json()["info"]["version"] == str(version)
            cached_at = id(server.host.active)
            for _ in range(100):
                version += 1
                server.host.load(ModelSpec(digits_onnx.parent, name="digits", version=str(version)))
                if id(server.host.active) == cached_at:
                    break
        assert c.get("/swagger.json").json()["info"]["version"] == str(version)


def test_request_in_flight_finishes_on_the_old_version_which_is_then_released(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    slow = SCRIPTS / "score_slow.py"
    server = start_server(ModelSpec(tmp_path, slow, name="slow", version="1"))
    old = server.host.active
    result: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: result.append(httpx.post(server.url + "/score", json={"sleep_ms": 1500}, timeout=30))
    )
    caller.start()
    deadline = time.monotonic() + 10
    while old.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert old.inflight == 1
    server.host.load(ModelSpec(tmp_path, slow, name="slow", version="2"))
    # retired but still in use: not closed under the request
    assert not old.closed
    r = httpx.post(server.url + "/score", json={"sleep_ms": 1}, timeout=30)
    assert r.headers["x-model-version"] == "2"
    caller.join(30)
    assert result[0].status_code == 200
    assert result[0].headers["x-model-version"] == "1"
    assert result[0].json() == {"slept_ms": 1500}
    deadline = time.monotonic() + 10
    while not old.closed and time.monotonic() < deadline:
        time.sleep(0.005)
    assert old.closed and old.inflight == 0


def test_refused_script_version_leaves_env_path_and_helpers_to_the_serving_one(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    bundles = {}
    for version in ("1", "2", "3"):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        (folder / "mf_refused_helper.py").write_text(f"VERSION = {version!r}\n")
        (folder / "score.py").write_text(
            "import os\nimport mf_refused_helper\n\n"
            "def init():\n    if mf_refused_helper.VERSION == '2':\n        raise RuntimeError('broken v2')\n\n"
            "def run(data):\n    import mf_refused_helper as h\n"
            "    return {'helper': h.VERSION, 'dir': os.environ['AZUREML_MODEL_DIR']}\n"
        )
        bundles[version] = folder
    server = start_server(ModelSpec(bundles["1"], "score.py", version="1"))
    with server.client() as c:
        assert c.post("/score", json={}).json() == {"helper": "1", "dir": str(bundles["1"])}
        with pytest.raises(ModelLoadError, match="init\\(\\) raised RuntimeError: broken v2"):
            server.host.load(ModelSpec(bundles["2"], "score.py", version="2"))
        assert os.environ["AZUREML_MODEL_DIR"] == os.environ["MODELFLEET_MODEL_DIR"] == str(bundles["1"])
        assert str(bundles["2"].resolve()) not in sys.path
        assert c.post("/score", json={}).json() == {"helper": "1", "dir": str(bundles["1"])}
        # the refused version's cached helper must not stand in for the next version's
        server.host.load(ModelSpec(bundles["3"], "score.py", version="3"))
        assert c.post("/score", json={}).json() == {"helper": "3", "dir": str(bundles["3"])}


def test_version_refused_at_warmup_leaves_the_environment_to_the_serving_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    old, new = tmp_path / "v1", tmp_path / "v2"
    old.mkdir()
    new.mkdir()
    (old / "score.py").write_text(
        "import os\n\ndef init():\n    pass\n\n"
        "def run(data):\n    return {'dir': os.environ['AZUREML_MODEL_DIR'], 'mf': os.environ['MODELFLEET_MODEL_DIR'],\n"
        "            'extra': os.environ.get('MF_TEST_CANDIDATE_ONLY')}\n"
    )
    (new / "score.py").write_text(
        "import os\n"
        "from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType\n"
        "from inference_schema.schema_decorators import input_schema\n\n"
        "def init():\n    os.environ['MF_TEST_CANDIDATE_ONLY'] = os.environ['AZUREML_MODEL_DIR']\n\n"
        "@input_schema('data', StandardPythonParameterType([1, 2, 3]))\n"
        "def run(data):\n    raise ValueError('broken at warm-up')\n"
    )
    host = ModelHost()
    try:
        host.load(ModelSpec(old, "score.py", version="1"))
        before = host.active
        assert before is not None
        answer = {"dir": str(old), "mf": str(old), "extra": None}
        assert before.runtime.predict(ScoreInput(b"{}")) == answer
        with pytest.raises(ModelLoadError) as info:
            host.load(ModelSpec(new, "score.py", version="2"))
        assert info.value.stage == "warmup"
        assert "broken at warm-up" in info.value.reason
        assert host.active is before
        # run() of the serving version reads the environment per request
        assert before.runtime.predict(ScoreInput(b"{}")) == answer
        assert os.environ["AZUREML_MODEL_DIR"] == os.environ["MODELFLEET_MODEL_DIR"] == str(old)
        assert "MF_TEST_CANDIDATE_ONLY" not in os.environ
        assert str(new.resolve()) not in sys.path and str(old.resolve()) in sys.path
        # a refused script in the serving version's own folder leaves that folder on sys.path
        shutil.copy(new / "score.py", old / "score_broken.py")
        with pytest.raises(ModelLoadError):
            host.load(ModelSpec(old, "score_broken.py", version="3"))
        assert str(old.resolve()) in sys.path
        assert before.runtime.predict(ScoreInput(b"{}")) == answer
    finally:
        host.unload()
        os.environ.pop("MF_TEST_CANDIDATE_ONLY", None)


def test_versions_sharing_a_script_folder_keep_it_after_one_is_retired(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a service update with a new model and the same source folder: the retired
    # version's close() must not take the folder (and its helpers) from the new one
    import sys

    src = tmp_path / "src"
    src.mkdir()
    (src / "mf_test_shared_helper.py").write_text("def answer():\n    return 42\n")
    (src / "score.py").write_text(
        "import os\n\ndef init():\n    pass\n\n"
        "def run(data):\n    import mf_test_shared_helper  # imported on first use, as scripts often do\n"
        "    return {'answer': mf_test_shared_helper.answer(), 'dir': os.path.basename(os.environ['AZUREML_MODEL_DIR'])}\n"
    )
    models = {v: tmp_path / f"model{v}" for v in ("1", "2")}
    for folder in models.values():
        folder.mkdir()
    server = start_server(ModelSpec(models["1"], src / "score.py", version="1"))
    first = server.host.active
    server.host.load(ModelSpec(models["2"], src / "score.py", version="2"))
    assert first is not None and first.closed  # retired with no request in flight: closed at once
    assert str(src.resolve()) in sys.path
    with server.client() as c:
        r = c.post("/score", json={})
        assert r.status_code == 200, r.text
        assert r.json() == {"answer": 42, "dir": "model2"}
    server.host.unload()
    assert str(src.resolve()) not in sys.path  # the last one out takes it off
