"""The MQTT fleet backend against a broker that wants a password: a refusal is named as one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.mqtt


def test_wrong_broker_password_is_reported_as_a_refusal(mosquitto: Any, tmp_path: Path) -> None:
    mosquitto.stop()
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "ctl", "secret"], check=True, capture_output=True)
    broker = type(mosquitto)(
        tmp_path / "secured", extra_config=f"allow_anonymous false\nuser root\npassword_file {passwords}\n"
    )
    broker.workdir.mkdir()
    broker.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "modelfleet.deployer", "fleet", "devices",
             "--broker", f"mqtt://ctl:wrong@127.0.0.1:{broker.port}"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "MODELFLEET_HOME": str(tmp_path / "home")},
        )
    finally:
        broker.stop()
    assert done.returncode == 1, done.stderr
    assert f"the MQTT broker at mqtt://127.0.0.1:{broker.port} refused the connection: " in done.stderr
    assert "not authorised" in done.stderr.lower() or "bad user name or password" in done.stderr.lower()
    assert "hint: check the user and password" in done.stderr
    assert "wrong" not in done.stderr  # the password never shows


def test_telemetry_over_the_broker_merges_histograms_and_drops_duplicates(mosquitto: Any) -> None:
    import paho.mqtt.client as mqtt
    from fleet_harness import wait_until  # type: ignore[import-not-found]

    from modelfleet.agent.protocol import DEFAULT_PREFIX, TelemetryBatch
    from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings

    def record(seq: int, version: int, requests: int, errors: int, counts: list[int]) -> dict[str, Any]:
        return {"seq": seq, "ts": 1.0, "model": {"name": "digits", "version": version}, "requests": requests,
                "errors": errors, "latency": {"buckets": [0.01, 0.05, 0.1], "counts": counts, "p99": 0.5}}

    with MqttFleetBackend(MqttFleetSettings(port=mosquitto.port)) as backend:
        since = time.time()
        device = mqtt.Client(client_id="telemetry-source", protocol=mqtt.MQTTv311)
        device.connect("127.0.0.1", mosquitto.port)
        device.loop_start()
        try:
            batches = [
                ("dev-a", [record(1, 2, 100, 10, [90, 10, 0, 0]), record(2, 1, 50, 50, [0, 0, 0, 50])]),
                ("dev-a", [record(1, 2, 100, 10, [90, 10, 0, 0])]),  # delivered twice (QoS 1): counted once
                ("dev-b", [record(1, 2, 100, 0, [0, 0, 100, 0])]),
            ]
            for device_id, records in batches:
                device.publish(f"{DEFAULT_PREFIX}/{device_id}/telemetry", TelemetryBatch(device_id, records).encode(), qos=1).wait_for_publish()
            device.publish(f"{DEFAULT_PREFIX}/dev-b/telemetry", b"\xc1 not msgpack", qos=1).wait_for_publish()
            device.publish(f"{DEFAULT_PREFIX}/dev-b/telemetry", TelemetryBatch("dev-b", [record(2, 2, 0, 0, [0, 0, 0, 0])]).encode(), qos=1).wait_for_publish()
            wait_until(lambda: backend._last_seq.get("dev-b") == 2, 10, "the last telemetry batch")
        finally:
            device.loop_stop()
            device.disconnect()
        health = backend.telemetry(["dev-a", "dev-b"], since=since, model=("digits", 2))
        # version 1's record is another model; the duplicate and the bad payload count for nothing
        assert (health.requests, health.errors, health.devices_reporting) == (200, 10, 2)
        # merged histogram [90, 10, 100, 0]: the 198th of 200 lies in the (0.05, 0.1] bucket
        assert health.p99_ms is not None and 50 < health.p99_ms <= 100
        assert backend.telemetry(["dev-a"], since=time.time() + 60).requests == 0  # outside the window
