"""Key auth: primary and secondary keys, rotation through the keys file without restart."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

from modelfleet.scoring import ModelSpec


def write_keys(path: Path, primary: str, secondary: str | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"primary": primary, "secondary": secondary}))
    os.replace(tmp, path)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def wait_status(client: httpx.Client, key: str, status: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/swagger.json", headers=bearer(key)).status_code == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"key {key!r} never got {status}")


def test_keys_required_except_on_health(start_server, digits_onnx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.json"
    write_keys(keys, "primary-1", "secondary-1")
    server = start_server(ModelSpec(digits_onnx.parent), keys_file=keys)
    row = {"data": [[0] * 64]}
    with server.client() as c:
        r = c.post("/score", json=row)
        assert r.status_code == 401
        assert r.json()["error"] == "missing or invalid key: send Authorization: Bearer <key>"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/score", json=row, headers=bearer("wrong")).status_code == 401
        assert c.post("/score", json=row, headers={"authorization": "primary-1"}).status_code == 401
        assert c.post("/score", json=row, headers=bearer("primary-1")).status_code == 200
        assert c.post("/score", json=row, headers=bearer("secondary-1")).status_code == 200
        for path in ("/swagger.json", "/metrics", "/v2/models/model"):
            assert c.get(path).status_code == 401, path
        for path in ("/", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path


def test_rotation_through_the_keys_file_needs_no_restart(start_server, digits_onnx, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.json"
    write_keys(keys, "old-primary", "old-secondary")
    server = start_server(ModelSpec(digits_onnx.parent), keys_file=keys)
    with server.client() as c, caplog.at_level("DEBUG"):
        assert c.get("/swagger.json", headers=bearer("old-secondary")).status_code == 200
        # rotate: the secondary becomes primary, a new secondary appears
        write_keys(keys, "old-secondary", "new-secondary")
        wait_status(c, "old-primary", 401)
        assert c.get("/swagger.json", headers=bearer("old-secondary")).status_code == 200
        assert c.get("/swagger.json", headers=bearer("new-secondary")).status_code == 200
        # a half-written or broken file keeps the previous keys
        keys.write_text("{not json")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        deadline = time.monotonic() + 5
        while "event=keys_reload_failed" not in caplog.text and time.monotonic() < deadline:
            assert c.get("/swagger.json", headers=bearer("new-secondary")).status_code == 200
            time.sleep(0.05)
        assert "event=keys_reload_failed" in caplog.text
        assert c.get("/swagger.json", headers=bearer("new-secondary")).status_code == 200
    logs = caplog.text
    for secret in ("old-primary", "old-secondary", "new-secondary"):
        assert secret not in logs


def test_set_keys_on_a_running_server(start_server, digits_onnx) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ModelSpec(digits_onnx.parent))
    with server.client() as c:
        assert c.get("/swagger.json").status_code == 200
        server.call(lambda: server.server.set_keys("k1", "k2"))
        assert c.get("/swagger.json").status_code == 401
        assert c.get("/swagger.json", headers=bearer("k2")).status_code == 200


def test_sighup_reloads_keys_in_the_cli(serve_process, digits_onnx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.json"
    write_keys(keys, "first")
    proc, url = serve_process("--model-dir", str(digits_onnx.parent), "--keys-file", str(keys))
    with httpx.Client(base_url=url) as c:
        assert c.get("/swagger.json", headers=bearer("first")).status_code == 200
        write_keys(keys, "second")
        proc.send_signal(signal.SIGHUP)
        wait_status(c, "second", 200)
        assert c.get("/swagger.json", headers=bearer("first")).status_code == 401
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert "event=keys_reloaded" in out
    assert "first" not in out and "second" not in out
