"""The quickstart's device side: broker, artifact server, agents; v1 then v2 in two stages; all stopped."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from modelfleet.deployer.fleet import local
from modelfleet.deployer.fleet.local import run_device_quickstart
from modelfleet.deployer.registry import Registry

pytestmark = pytest.mark.mqtt


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_device_quickstart_rolls_v1_then_v2_and_stops_everything(
    tmp_path: Path, digits_onnx: Path, digits_onnx_v2: Path, monkeypatch: pytest.MonkeyPatch, mosquitto: Any
) -> None:
    # (the `mosquitto` fixture only makes a missing broker skip locally and fail in CI)
    registry = Registry(tmp_path / "home")
    v1 = registry.register("digits", digits_onnx).model
    v2 = registry.register("digits", digits_onnx_v2).model
    fleets: list[local.LocalFleet] = []
    real_enter = local.LocalFleet.__enter__

    def spy(self: local.LocalFleet) -> local.LocalFleet:
        fleets.append(self)
        return real_enter(self)

    monkeypatch.setattr(local.LocalFleet, "__enter__", spy)
    lines: list[str] = []

    summary = run_device_quickstart(registry, v1, v2, tmp_path / "fleet", lines.append, devices=3)

    assert [c["model_version"] for c in summary.calls] == ["1", "2"]
    assert [r["state"] for r in summary.rollouts] == ["succeeded", "succeeded"]
    assert [len(r["stages"]) for r in summary.rollouts] == [1, 2]
    assert [(s["model"], s["status"]) for s in summary.states] == [("digits:2", "applied")] * 3
    assert any("stage 2 (100%, 2 devices): passed" in line for line in lines)
    (fleet,) = fleets
    assert fleet.broker is None and fleet.agents == [] and fleet.server is None
    assert not _listening(fleet.broker_port)


def test_interrupt_mid_way_stops_broker_and_agents(tmp_path: Path, mosquitto: Any) -> None:
    seen: list[local.LocalAgent] = []

    def interrupt(line: str) -> None:
        if "device agents online" in line:
            seen.extend(fleet.agents)
            raise KeyboardInterrupt

    fleet = local.LocalFleet(Registry(tmp_path / "home"), tmp_path / "fleet", devices=2, progress=interrupt)
    with pytest.raises(KeyboardInterrupt), fleet:
        pass
    assert len(seen) == 2
    assert all(agent.proc.poll() is not None for agent in seen)
    assert fleet.broker is None and fleet.server is None
    assert not _listening(fleet.broker_port)
