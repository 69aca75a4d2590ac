"""`modelfleet quickstart`: from nothing to a called, updated endpoint, then cleaned up."""

from __future__ import annotations

import json
import os
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
