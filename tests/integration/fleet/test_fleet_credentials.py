"""Broker credentials over a broker that wants a password: a rollout remembers the URL and the
user (never the password); resume and rollback take the password from the environment or a file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelfleet.agent.protocol import (
    DEFAULT_PREFIX,
    ActiveModel,
    DesiredState,
    Presence,
    ReportedState,
)

pytestmark = pytest.mark.mqtt


class FakeDevice:
    """Answers every desired state at once with an `applied` report (no model is loaded)."""

    def __init__(self, device_id: str, port: int, password: str) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(device_id, password)
        self.client.on_message = self._on_desired
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{DEFAULT_PREFIX}/{device_id}/desired", qos=1)
        self.client.loop_start()
        # known to the controller once its retained presence is on the broker
        self.client.publish(
            f"{DEFAULT_PREFIX}/{device_id}/presence", Presence(device_id, online=True).encode(), qos=1, retain=True
        ).wait_for_publish(10)

    def _on_desired(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        desired = DesiredState.decode(bytes(msg.payload))
        active = ActiveModel.of(desired.model) if desired.model else None
        report = ReportedState(self.device_id, desired.version, "applied", active=active, applied_version=desired.version)
        client.publish(f"{DEFAULT_PREFIX}/{self.device_id}/reported", report.encode(), qos=1, retain=True)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def secured(mosquitto: Any, tmp_path: Path) -> Iterator[Any]:
    mosquitto.stop()
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    for user, password in (("ctl", "s3cret"), ("dev-x", "devpw")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True, capture_output=True)
    broker = type(mosquitto)(tmp_path / "secured", extra_config=f"allow_anonymous false\nuser root\npassword_file {passwords}\n")
    broker.workdir.mkdir()
    broker.start()
    yield broker
    broker.stop()


def test_resume_and_rollback_use_the_stored_broker_with_a_password_from_env_or_file(
    secured: Any, tmp_path: Path, digits_onnx: Path
) -> None:
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings
    from modelfleet.deployer.fleet.operations import backend_record, resolve_model
    from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
    from modelfleet.deployer.fleet.store import FleetStore
    from modelfleet.deployer.registry.store import Registry

    home = tmp_path / "home"
    Registry(home).register("digits", digits_onnx)
    env = {k: v for k, v in os.environ.items() if k not in ("MODELFLEET_MQTT_URL", "MODELFLEET_BROKER_PASSWORD")}
    env["MODELFLEET_HOME"] = str(home)

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelfleet.deployer", "fleet", *args],
            capture_output=True, text=True, timeout=60, env={**env, **extra},
        )

    device = FakeDevice("dev-x", secured.port, "devpw")
    try:
        url = f"mqtt://ctl:s3cret@127.0.0.1:{secured.port}"
        done = cli("rollout", "create", "r", "--model", "digits:1", "--target", "*", "--broker", url, "--wait")
        assert done.returncode == 0, done.stderr
        store = FleetStore(home)
        assert store.get("r").backend == {"kind": "mqtt", "url": f"mqtt://127.0.0.1:{secured.port}", "username": "ctl"}
        with sqlite3.connect(home / "registry.db") as db:
            assert not any("s3cret" in str(row) for row in db.execute("SELECT * FROM fleet_rollouts"))

        # the stored connection without a password: the broker refuses, and the hint says where one goes
        refused = cli("rollout", "rollback", "r")
        assert refused.returncode != 0
        assert f"the MQTT broker at mqtt://127.0.0.1:{secured.port} refused the connection" in refused.stderr
        assert "MODELFLEET_BROKER_PASSWORD" in refused.stderr
        assert store.get("r").state == "succeeded"

        done = cli("rollout", "rollback", "r", MODELFLEET_BROKER_PASSWORD="s3cret")
        assert done.returncode == 0, done.stderr
        assert store.get("r").state == "rolled_back"

        # a rollout whose controller died, resumed with the password from a file
        v1 = resolve_model("digits:1", None, home)
        with MqttFleetBackend(MqttFleetSettings.from_url(url)) as backend:
            RolloutEngine(store, backend).create(RolloutSpec("r2", v1, backend=backend_record(url)))
        secret = tmp_path / "broker-password"
        secret.write_text("s3cret\n")
        done = cli("rollout", "resume", "r2", "--wait", "--broker-password-file", str(secret), "--output", "json")
        assert done.returncode == 0, done.stderr
        assert store.get("r2").state == "succeeded"
        assert "s3cret" not in done.stdout + done.stderr
    finally:
        device.stop()
