"""The `serve` command as containers run it: env aliases, several workers, start-up failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

SCRIPTS = Path(__file__).resolve().parents[2] / "fixtures" / "scoring" / "scripts"


def test_azureml_environment_runs_an_entry_script_unchanged(serve_process, tmp_path, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(digits_onnx, tmp_path / "model.onnx")
    _proc, url = serve_process(
        env={"AZUREML_MODEL_DIR": str(tmp_path), "AZUREML_ENTRY_SCRIPT": str(SCRIPTS / "score_schema.py")}
    )
    r = httpx.post(url + "/score", json={"data": digits_rows[:2]})
    assert r.json() == {"label": [0, 1]}


def test_several_workers_share_the_port(serve_process, digits_onnx, digits_rows) -> None:  # type: ignore[no-untyped-def]
    proc, url = serve_process("--model-dir", str(digits_onnx.parent), "--workers", "2")
    pids = set()
    for _ in range(40):
        with httpx.Client(base_url=url) as c:  # a new connection each time
            r = c.post("/score", json={"data": digits_rows[:1]})
            assert r.status_code == 200
            pids.add(r.headers["x-request-id"].split("-")[0])
    assert len(pids) == 2  # the request id prefix is per process
    proc.terminate()
    assert proc.wait(10) == 0


def test_startup_failure_exits_nonzero_with_the_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = subprocess.run(
        [sys.executable, "-m", "modelfleet.scoring", "serve", "--model-dir", str(tmp_path), "--port", "0",
         "--entry-script", str(SCRIPTS / "score_bad_init.py")],
        capture_output=True, text=True, timeout=60, env=os.environ,
    )
    assert run.returncode == 1
    assert "event=startup_failed stage=load" in run.stderr
    assert "init() raised FileNotFoundError: model.pkl not found" in run.stderr

    empty = subprocess.run(
        [sys.executable, "-m", "modelfleet.scoring", "serve", "--model-dir", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert empty.returncode == 1
    assert "no .onnx or .tflite file in" in empty.stderr


def test_bad_keys_file_with_several_workers_is_one_line_before_forking(tmp_path, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.json"
    keys.write_text("nope")
    run = subprocess.run(
        [sys.executable, "-m", "modelfleet.scoring", "serve", "--model-dir", str(digits_onnx.parent), "--port", "0",
         "--workers", "2", "--keys-file", str(keys)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f'error: keys_file (--keys-file / MODELFLEET_KEYS_FILE): {keys} is not JSON; '
        'expected {"primary": "...", "secondary": "..."}'
    )


def test_port_in_use_is_one_line_naming_the_address(tmp_path, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            run = subprocess.run(
                [sys.executable, "-m", "modelfleet.scoring", "serve", "--model-dir", str(digits_onnx.parent),
                 "--host", "127.0.0.1", "--port", str(port), "--workers", workers],
                capture_output=True, text=True, timeout=60,
            )
            assert run.returncode == 2, run.stderr
            assert run.stderr.strip() == (
                f"error: port (--port / MODELFLEET_PORT): cannot listen on 127.0.0.1:{port}: Address already in use"
            )
    run = subprocess.run(
        [sys.executable, "-m", "modelfleet.scoring", "serve", "--model-dir", str(digits_onnx.parent),
         "--host", "no-such-host.invalid", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: host (--host / MODELFLEET_HOST): cannot listen on no-such-host.invalid:0: ")


def test_live_but_not_ready_until_init_finishes(serve_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    proc, url = serve_process(
        "--model-dir", str(tmp_path), "--entry-script", str(SCRIPTS / "score_slow_init.py"), wait=False
    )
    deadline = time.monotonic() + 20
    live = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            live = httpx.get(url + "/v2/health/live")
            break
        except httpx.TransportError:
            time.sleep(0.02)
    assert live is not None and live.status_code == 200
    assert httpx.get(url + "/v2/health/ready").status_code == 503
    assert httpx.get(url + "/").status_code == 503
    assert httpx.post(url + "/score", json={"data": [1]}).status_code == 503
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 20
    while httpx.get(url + "/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.post(url + "/score", json={"data": [1, 2, 3]}).json() == {"sum": 6}
