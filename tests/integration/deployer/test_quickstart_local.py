"""`modelfleet quickstart`: from nothing to a called, updated endpoint, then cleaned up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from typer.testing import Result

from modelfleet.deployer.registry import Registry
from modelfleet.deployer.services import ServiceManager


def test_quickstart_registers_deploys_calls_updates_and_cleans_up(
    cli: Callable[..., Result], home: Path
) -> None:
    out = cli("quickstart", "-o", "json")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["versions"] == ["quickstart-digits:1", "quickstart-digits:2"]
    assert [c["model_version"] for c in summary["calls"]] == ["1", "2"]
    assert summary["calls"][0]["labels"] == [0, 1, 2]
    assert summary["service_kept"] is False
    registry = Registry(home)
    assert [m.key for m in registry.list_models()] == summary["versions"]
    assert registry.list_services() == []


def test_quickstart_keep_leaves_a_working_service_and_reruns(home: Path) -> None:
    """Run as the installed command would be (a subprocess), twice: the second run
    finds the same bytes registered and replaces the kept service."""
    env = dict(os.environ, MODELFLEET_HOME=str(home))
    cmd = [sys.executable, "-m", "modelfleet.deployer", "quickstart", "--keep"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    assert "quickstart-digits at http://127.0.0.1:" in first.stdout and "(kept)" in first.stdout
    assert "-> registered quickstart-digits:1" in first.stderr
    manager = ServiceManager(Registry(home))
    record, status = manager.status("quickstart-digits")
    assert status.state == "healthy" and record.models == ["quickstart-digits:2"]

    second = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "already registered (same bytes) as quickstart-digits:1" in second.stderr
    assert "deleted (pass --keep to keep it)" in second.stdout
    assert manager.registry.list_services() == []


def test_ctrl_c_during_quickstart_removes_the_service(home: Path) -> None:
    import pytest

    from modelfleet.deployer.quickstart import run_quickstart

    registry = Registry(home)
    ports: list[int] = []

    def interrupt_once_ready(line: str) -> None:
        if "is ready at" in line:
            ports.append(int(line.split("127.0.0.1:")[1].split("/")[0]))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_quickstart(registry, progress=interrupt_once_ready)
    assert registry.list_services() == []
    assert not (home / "services" / "quickstart-digits").exists()
    # the server it had started is gone too, not orphaned
    assert ports, "quickstart never reported a ready service"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", ports[0])) != 0


def test_registry_serve_command_serves_artifacts(home: Path, digits_onnx: Path) -> None:
    import httpx

    registry = Registry(home)
    model = registry.register("digits", digits_onnx).model
    env = dict(os.environ, MODELFLEET_HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.deployer", "registry", "serve", "--port", "0",
         "--token", "s3cret-token", "-o", "json"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads("".join(proc.stdout.readline() for _ in range(4)))
        assert info["token"] == "s3cret-token"
        url = f"{info['url']}/v1/artifacts/{model.sha256}"
        assert httpx.get(url).status_code == 401
        got = httpx.get(url, headers={"Authorization": "Bearer s3cret-token"})
        assert got.status_code == 200 and got.content == digits_onnx.read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)
