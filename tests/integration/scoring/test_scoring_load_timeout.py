"""A load whose init() hangs: refused with stage "timeout" after --load-timeout-s, the old version serves.

The hung init() waits for a file the test writes at the end (or gives up after a
minute), so its thread does return: what it loaded then must be closed, never served.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from modelfleet.scoring import ModelHost, ModelLoadError, ModelSpec

ADMIN = "admin-token-for-the-timeout-test"

# init() blocks until RELEASE exists (far longer than any timeout the tests use)
HANGS = '''
import os
import time

RELEASE = {release!r}

def init():
    deadline = time.monotonic() + 60
    while not os.path.exists(RELEASE) and time.monotonic() < deadline:
        time.sleep(0.01)

def run(data):
    return {{"version": "hung"}}
'''

ANSWERS = '''
import os

def init():
    pass

def run(data):
    return {{"version": {version!r}, "dir": os.environ["AZUREML_MODEL_DIR"]}}
'''


def _bundle(root: Path, name: str, text: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "score.py").write_text(text)
    return folder


def _hung_bundle(tmp_path: Path) -> tuple[Path, Path]:
    release = tmp_path / "release-init"
    return _bundle(tmp_path, "hangs", HANGS.format(release=str(release))), release


def test_hung_init_is_refused_and_its_late_result_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v1 = _bundle(tmp_path, "v1", ANSWERS.format(version="1"))
    v3 = _bundle(tmp_path, "v3", ANSWERS.format(version="3"))
    hangs, release = _hung_bundle(tmp_path)
    host = ModelHost(load_timeout_s=0.5)
    caplog.set_level(logging.INFO, logger="modelfleet.scoring.host")
    try:
        host.load(ModelSpec(v1, "score.py", version="1"))
        first = host.active
        assert first is not None
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as info:
            host.load(ModelSpec(hangs, "score.py", version="2"))
        assert time.monotonic() - started < 30
        assert info.value.stage == "timeout"
        assert "did not finish within 0.5 s (--load-timeout-s)" in info.value.reason
        assert "old version keeps serving" in info.value.reason
        assert host.active is first and not first.closed
        assert os.environ["AZUREML_MODEL_DIR"] == str(v1)
        assert host.metrics.load_failures == 1
        # the hung init() still holds nothing the next load needs
        host.load(ModelSpec(v3, "score.py", version="3"))
        active = host.active
        assert active is not None and active.version == "3"
        # let the hung init() return: its version is closed, not served
        release.write_text("")
        deadline = time.monotonic() + 30
        while not any("event=late_load_dropped" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the late load was never dropped"
            time.sleep(0.02)
        assert host.active is active
        assert os.environ["AZUREML_MODEL_DIR"] == str(v3)
        assert not any(m.startswith("modelfleet_entry_") and m.endswith("_score") and
                       getattr(sys.modules[m], "__file__", "").startswith(str(hangs)) for m in list(sys.modules))
        assert str(hangs.resolve()) not in sys.path
    finally:
        release.write_text("")
        host.unload()


def _admin(url: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/repository/models/m/load", json=body,
        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_admin_load_that_hangs_is_refused_and_the_next_one_succeeds(  # type: ignore[no-untyped-def]
    serve_process, tmp_path: Path, workers: str
) -> None:
    v1 = _bundle(tmp_path, "v1", ANSWERS.format(version="1"))
    v3 = _bundle(tmp_path, "v3", ANSWERS.format(version="3"))
    hangs, release = _hung_bundle(tmp_path)
    admin = tmp_path / "admin.key"
    admin.write_text(ADMIN + "\n")
    _proc, url = serve_process(
        "--model-dir", str(v1), "--entry-script", "score.py", "--model-name", "m",
        "--admin-key-file", str(admin), "--workers", workers, "--load-timeout-s", "1",
    )
    try:
        r = _admin(url, {"model_dir": str(hangs), "entry_script": "score.py", "version": "2"})
        assert r.status_code == 422, r.text
        assert r.json()["stage"] == "timeout"
        assert "did not finish within 1 s (--load-timeout-s)" in r.json()["error"]
        if workers == "2":
            assert r.json()["error"].startswith("worker ")
        for _ in range(10):  # new connections: with 2 workers, both answer
            with httpx.Client(base_url=url, timeout=10) as c:
                assert c.post("/score", json={}).json() == {"version": "1", "dir": str(v1)}
        r = _admin(url, {"model_dir": str(v3), "entry_script": "score.py", "version": "3"})
        assert r.status_code == 200, r.text
        for _ in range(10):
            with httpx.Client(base_url=url, timeout=10) as c:
                answer = c.post("/score", json={})
                assert answer.json() == {"version": "3", "dir": str(v3)}
                assert answer.headers["x-model-version"] == "3"
    finally:
        release.write_text("")


def test_start_up_load_that_hangs_exits_1_naming_the_timeout(serve_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hangs, release = _hung_bundle(tmp_path)
    try:
        proc, _url = serve_process(
            "--model-dir", str(hangs), "--entry-script", "score.py", "--load-timeout-s", "0.5", wait=False,
        )
        assert proc.wait(30) == 1
        out = proc.stdout.read() if proc.stdout else ""
        assert "event=startup_failed stage=timeout" in out
        assert "did not finish within 0.5 s (--load-timeout-s)" in out
    finally:
        release.write_text("")


# run() blocks when the warm-up calls it with the schema's example
HANGS_AT_WARMUP = '''
import os
import time

from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema

RELEASE = {release!r}

def init():
    pass

@input_schema("data", StandardPythonParameterType([1, 2, 3]))
def run(data):
    deadline = time.monotonic() + 60
    while not os.path.exists(RELEASE) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {{"version": "hung"}}
'''


def test_hung_warm_up_is_refused_too(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v1 = _bundle(tmp_path, "v1", ANSWERS.format(version="1"))
    release = tmp_path / "release-warmup"
    hangs = _bundle(tmp_path, "hangs", HANGS_AT_WARMUP.format(release=str(release)))
    host = ModelHost(load_timeout_s=0.5)
    caplog.set_level(logging.INFO, logger="modelfleet.scoring.host")
    try:
        host.load(ModelSpec(v1, "score.py", version="1"))
        first = host.active
        with pytest.raises(ModelLoadError) as info:
            host.load(ModelSpec(hangs, "score.py", version="2"))
        assert info.value.stage == "timeout"
        assert host.active is first
        release.write_text("")
        deadline = time.monotonic() + 30
        while not any("event=late_load_dropped" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the late load was never dropped"
            time.sleep(0.02)
        assert host.active is first and first is not None and not first.closed
        assert str(hangs.resolve()) not in sys.path
    finally:
        release.write_text("")
        host.unload()


# The first init() (version 1) hangs until A_GO, then fails; the second (version 2,
# same folder) waits until B_GO and imports the helper module beside score.py.
LATE_FAILURE = '''
import os
import time

def _wait(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)

def init():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        os.close(os.open(os.path.join(here, "first"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        open(os.path.join(here, "b_started"), "w").close()
        _wait(os.path.join(here, "b_go"))
        import helper  # noqa: F401
        return
    _wait(os.path.join(here, "a_go"))
    raise RuntimeError("the hung init() failed after all")

def run(data):
    import helper
    return {"helper": helper.VALUE}
'''


def test_hung_load_that_fails_late_leaves_the_next_load_of_its_folder_alone(tmp_path: Path) -> None:
    folder = _bundle(tmp_path, "same", LATE_FAILURE)
    (folder / "helper.py").write_text("VALUE = 7\n")
    host = ModelHost(load_timeout_s=0.5)
    second: list[object] = []
    try:
        with pytest.raises(ModelLoadError) as info:
            host.load(ModelSpec(folder, "score.py", version="1"))
        assert info.value.stage == "timeout"
        hung = [t for t in threading.enumerate() if t.name == "modelfleet-load-1"]
        assert len(hung) == 1

        def load_again() -> None:
            try:
                host.load(ModelSpec(folder, "score.py", version="2"))
            except ModelLoadError as exc:
                second.append(exc)
            else:
                second.append(host.active)

        again = threading.Thread(target=load_again)
        host.load_timeout_s = 60
        again.start()
        deadline = time.monotonic() + 30
        while not (folder / "b_started").exists():
            assert time.monotonic() < deadline, "the second load never reached its init()"
            time.sleep(0.01)
        # the given-up load fails now, while the second one (same folder) runs its init()
        (folder / "a_go").write_text("")
        hung[0].join(30)
        assert not hung[0].is_alive()
        (folder / "b_go").write_text("")
        again.join(60)
        assert len(second) == 1 and not isinstance(second[0], ModelLoadError), second
        active = host.active
        assert active is not None and active.version == "2"
        assert str(folder.resolve()) in sys.path
    finally:
        for name in ("a_go", "b_go"):
            (folder / name).write_text("")
        host.unload()
    assert str(folder.resolve()) not in sys.path


# init() notes that it started, then blocks until RELEASE exists
HANGS_NOTED = '''
import os
import time

def init():
    open({started!r}, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists({release!r}) and time.monotonic() < deadline:
        time.sleep(0.01)

def run(data):
    return {{"version": "hung"}}
'''


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stop_during_a_load_does_not_wait_for_the_load(  # type: ignore[no-untyped-def]
    serve_process, tmp_path: Path, workers: str
) -> None:
    """SIGTERM while init() hangs: the server exits 0 without waiting for the load
    (or for its timeout, 120 s here): the load runs on a daemon thread, not in the
    loop's default executor, which asyncio.run joins on the way out."""
    v1 = _bundle(tmp_path, "v1", ANSWERS.format(version="1"))
    started, release = tmp_path / "init-started", tmp_path / "release-init"
    hangs = _bundle(tmp_path, "hangs", HANGS_NOTED.format(started=str(started), release=str(release)))
    admin = tmp_path / "admin.key"
    admin.write_text(ADMIN + "\n")
    proc, url = serve_process(
        "--model-dir", str(v1), "--entry-script", "score.py", "--model-name", "m",
        "--admin-key-file", str(admin), "--workers", workers, "--load-timeout-s", "120",
    )
    answers: list[object] = []

    def load() -> None:
        try:
            answers.append(_admin(url, {"model_dir": str(hangs), "entry_script": "score.py", "version": "2"}))
        except httpx.HTTPError as exc:
            answers.append(exc)

    loading = threading.Thread(target=load)
    loading.start()
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the load never reached init()"
            time.sleep(0.02)
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        release.write_text("")
        loading.join(60)
    assert len(answers) == 1


def test_a_load_queued_behind_a_hung_one_is_answered_503_at_stop(serve_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--workers 2: a stop answers the loads still queued (503) instead of leaving them
    to the workers' drain, which would close their connections unanswered."""
    v1 = _bundle(tmp_path, "v1", ANSWERS.format(version="1"))
    v3 = _bundle(tmp_path, "v3", ANSWERS.format(version="3"))
    started, release = tmp_path / "init-started", tmp_path / "release-init"
    hangs = _bundle(tmp_path, "hangs", HANGS_NOTED.format(started=str(started), release=str(release)))
    admin = tmp_path / "admin.key"
    admin.write_text(ADMIN + "\n")
    proc, url = serve_process(
        "--model-dir", str(v1), "--entry-script", "score.py", "--model-name", "m",
        "--admin-key-file", str(admin), "--workers", "2", "--load-timeout-s", "120",
    )
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    answers: dict[str, object] = {}

    def load(version: str, folder: Path) -> None:
        try:
            answers[version] = _admin(url, {"model_dir": str(folder), "entry_script": "score.py", "version": version})
        except httpx.HTTPError as exc:
            answers[version] = exc

    hung = threading.Thread(target=load, args=("2", hangs))
    queued = threading.Thread(target=load, args=("3", v3))
    try:
        hung.start()
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the load never reached init()"
            time.sleep(0.02)
        queued.start()
        while not any("event=swap_queued version=3" in line for line in list(lines)):
            assert time.monotonic() < deadline, "the second load was never queued"
            time.sleep(0.02)
        proc.terminate()
        queued.join(30)
        answer = answers["3"]
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503
        assert answer.json()["error"] == "the server is stopping; this load was not started"
        assert proc.wait(30) == 0
    finally:
        release.write_text("")
        hung.join(60)
        queued.join(60)
