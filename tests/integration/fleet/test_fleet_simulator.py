"""The many-device simulator (agent reconciler + protocol, no models) against the MQTT backend."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings
from modelfleet.deployer.fleet.operations import set_device_model
from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
from modelfleet.deployer.fleet.store import FleetError, FleetStore

pytestmark = pytest.mark.mqtt
COUNT = 60


def ref(version: int) -> ModelVersionRef:
    return ModelVersionRef(name="sim", version=version, url="http://127.0.0.1:1/x", sha256=f"{version:064x}", size=1)


@pytest.fixture
def simulated(mosquitto: Any) -> Iterator[MqttFleetBackend]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.deployer.fleet.simulator", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}",
         "--count", str(COUNT), "--tags", '{"site": "sim"}', "--fail-version", "3"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["devices"] == COUNT
        backend = MqttFleetBackend(MqttFleetSettings(port=mosquitto.port)).connect()
        yield backend
        backend.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_simulated_fleet_is_listed_and_rolled_out_in_stages(simulated: MqttFleetBackend, tmp_path: Path) -> None:
    devices = simulated.devices()
    assert len(devices) == COUNT and all(d.online and d.tags["site"] == "sim" for d in devices)
    engine = RolloutEngine(FleetStore(tmp_path), simulated)
    engine.create(RolloutSpec("sim-2", ref(2), target="tags.ring < 5", stages=(10, 50, 100)))
    r = engine.drive("sim-2")
    assert r.state == "succeeded", r.reason
    assert [s["devices"] for s in r.stage_log] == [3, 12, 15]
    on_v2 = {d.device_id for d in simulated.devices() if d.active == "sim:2"}
    assert len(on_v2) == COUNT // 2


def test_simulated_warmup_failure_halts_the_canary_stage(simulated: MqttFleetBackend, tmp_path: Path) -> None:
    engine = RolloutEngine(FleetStore(tmp_path), simulated)
    engine.create(RolloutSpec("sim-3", ref(3), target="*", stages=(5, 100), max_failure=0.5))
    r = engine.drive("sim-3")
    assert r.state == "failed"
    # the stage halts as soon as failures pass the 50 % budget: after the 2nd or the 3rd report
    assert re.search(r"stage 1: [23] of 3 devices failed", r.reason or ""), r.reason
    assert "warmup: simulated warm-up failure of version 3" in (r.reason or "")
    assert all(d.active != "sim:3" for d in simulated.devices())


def test_a_device_that_refuses_a_version_set_by_hand_says_why(simulated: MqttFleetBackend, tmp_path: Path) -> None:
    one = simulated.devices()[0].device_id
    with pytest.raises(FleetError, match=f"device '{one}' refused sim:3: warmup: simulated warm-up failure of version 3"):
        set_device_model(FleetStore(tmp_path), simulated, one, ref(3), wait_s=30)
    assert simulated.device(one).active != "sim:3"  # type: ignore[union-attr]
