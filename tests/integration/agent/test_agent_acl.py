"""The example broker set-up (deploy/mosquitto): per-device passwords and a `%u` ACL on a real mosquitto."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from agent_harness import REPO, Controller, RegistryHandle, wait_until  # type: ignore[import-not-found]

pytestmark = pytest.mark.mqtt
PASSWORDS: dict[str, str] = {"modelfleet-controller": "ctl-secret"}  # devices: filled by the fixture


@pytest.fixture
def secured_broker(mosquitto: Any, tmp_path: Path) -> Iterator[Any]:
    """mosquitto with the shipped ACL and a password file made by the shipped make-passwords.sh."""
    mosquitto.stop()
    passwords = tmp_path / "passwords"
    made = subprocess.run(
        [str(REPO / "deploy" / "mosquitto" / "make-passwords.sh"), str(passwords),
         PASSWORDS["modelfleet-controller"], "dev-a", "dev-b"],
        check=True, capture_output=True, text=True,
    )
    for line in made.stdout.splitlines():  # "device<TAB>password", printed once for provisioning
        device, password = line.split("\t")
        PASSWORDS[device] = password
    assert set(PASSWORDS) == {"modelfleet-controller", "dev-a", "dev-b"}
    acl = tmp_path / "acl"
    shutil.copy(REPO / "deploy" / "mosquitto" / "acl", acl)
    broker = type(mosquitto)(
        tmp_path / "secured",
        extra_config=f"allow_anonymous false\nuser root\npassword_file {passwords}\nacl_file {acl}\n",
    )
    broker.workdir.mkdir()
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("a/b", "invalid device id: a/b"),
        ("-dev", "invalid device id: -dev"),  # the agent refuses it too: it must start with a letter or digit
        ("d" * 129, "invalid device id: " + "d" * 129),
        # a device by that name would replace the controller's password and get its ACL (every device's topics)
        ("modelfleet-controller", "modelfleet-controller is the controller's user name, not a device id"),
    ],
)
def test_make_passwords_refuses_a_bad_device_id(tmp_path: Path, device: str, message: str) -> None:
    existing = tmp_path / "pw"
    existing.write_text("dev-1:$7$kept\n")
    made = subprocess.run(
        [str(REPO / "deploy" / "mosquitto" / "make-passwords.sh"), str(existing), "x", "dev-1", device],
        capture_output=True, text=True,
    )
    assert made.returncode == 2 and message in made.stderr
    assert existing.read_text() == "dev-1:$7$kept\n"  # checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pw"]


class Device:
    """A bare MQTT client logged in as one device."""

    def __init__(self, port: int, user: str, password: str, role: str = "probe") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: dict[int, tuple[int, ...]] = {}
        self.connack: int | None = None
        self.connected = threading.Event()
        self.client = mqtt.Client(client_id=f"{user}-{role}", clean_session=True)
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, qos: self.granted.__setitem__(mid, tuple(qos))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc
        self.connected.set()

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        granted = wait_until(lambda: self.granted.get(mid), 10, f"SUBACK for {topic}")
        return int(granted[0])

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def try_publish(self, topic: str, payload: bytes) -> None:
        """Publish where the broker may refuse by dropping the connection (mosquitto 2.0 sometimes does)."""
        with contextlib.suppress(RuntimeError, ValueError):
            self.client.publish(topic, payload, qos=1).wait_for_publish(2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_cannot_read_or_write_another_devices_topics(secured_broker: Any) -> None:
    controller = Controller(secured_broker.port, "modelfleet-controller", PASSWORDS["modelfleet-controller"]).start()
    a = Device(secured_broker.port, "dev-a", PASSWORDS["dev-a"])
    b = Device(secured_broker.port, "dev-b", PASSWORDS["dev-b"])
    try:
        assert a.connected.wait(10) and b.connected.wait(10)
        assert a.connack == 0 and b.connack == 0
        # reading: mosquitto 2.0 may grant A's subscription to B's topics, but the ACL is
        # checked per message, so nothing of B's is ever delivered to A
        a.subscribe("modelfleet/v1/dev-b/desired")
        a.subscribe("modelfleet/v1/+/commands")
        assert b.subscribe("modelfleet/v1/dev-b/desired") == 1
        assert a.subscribe("modelfleet/v1/dev-a/desired") == 1
        controller.publish_raw("modelfleet/v1/dev-b/desired", b'{"secret": "for b"}', retain=True)
        controller.publish_raw("modelfleet/v1/dev-a/desired", b'{"for": "a"}', retain=True)
        wait_until(lambda: any(t.endswith("dev-a/desired") for t, _ in a.messages), 10, "A's own desired")
        wait_until(lambda: any(t.endswith("dev-b/desired") for t, _ in b.messages), 10, "B's own desired")
        controller.publish_raw("modelfleet/v1/dev-b/commands", b'{"for": "b"}')
        controller.publish_raw("modelfleet/v1/dev-a/commands", b'{"for": "a"}')
        wait_until(lambda: any(t.endswith("dev-a/commands") for t, _ in a.messages), 10, "A's own command")
        assert all("dev-b" not in topic for topic, _ in a.messages)

        # writing: what A publishes on B's topics never reaches anyone; its own does
        forger = Device(secured_broker.port, "dev-a", PASSWORDS["dev-a"], role="forger")
        assert forger.connected.wait(10)
        for kind in ("reported", "desired", "presence", "telemetry", "responses"):
            forger.try_publish(f"modelfleet/v1/dev-b/{kind}", b"forged by a")
        a.publish("modelfleet/v1/dev-a/presence", b'{"device_id": "dev-a", "online": true}')
        wait_until(lambda: controller.presence.get("dev-a"), 10, "A's own presence")
        assert "dev-b" not in controller.reported and "dev-b" not in controller.presence
        assert all(payload != b"forged by a" for _, payload in b.messages)
        forger.close()
    finally:
        a.close()
        b.close()
        controller.stop()


def test_wrong_password_is_refused(secured_broker: Any) -> None:
    intruder = Device(secured_broker.port, "dev-a", "guessed")
    try:
        assert intruder.connected.wait(10)
        assert intruder.connack in (4, 5)  # bad user name or password / not authorised
    finally:
        intruder.close()


def test_agent_runs_under_the_acl_with_its_own_credentials(
    secured_broker: Any, artifact_registry: RegistryHandle, agents: Any, digits_onnx: Path, tmp_path: Path,
) -> None:
    controller = Controller(secured_broker.port, "modelfleet-controller", PASSWORDS["modelfleet-controller"]).start()
    secret = tmp_path / "dev-a.password"
    secret.write_text(PASSWORDS["dev-a"] + "\n")
    try:
        v1 = artifact_registry.register("digits", digits_onnx)
        agents("dev-a", secured_broker.port, broker_password_file=str(secret))
        report = controller.wait_reported("dev-a", controller.desire("dev-a", v1), "applied")
        assert report.active is not None and report.active.version == 1
        wait_until(lambda: controller.telemetry_records("dev-a"), 15, "telemetry through the ACL")
        reply = controller.command("dev-a", "get-state")
        assert reply.ok
    finally:
        controller.stop()


def test_shipped_example_config_starts_and_enforces_passwords(mosquitto: Any, tmp_path: Path) -> None:
    """deploy/mosquitto/mosquitto.conf as shipped, with only its paths and port moved into tmp."""
    mosquitto.stop()
    port = mosquitto.port
    made = subprocess.run(
        [str(REPO / "deploy" / "mosquitto" / "make-passwords.sh"), str(tmp_path / "passwords"), "ctl", "dev-x"],
        check=True, capture_output=True, text=True,
    )
    device_password = made.stdout.split("\t")[1].strip()
    shutil.copy(REPO / "deploy" / "mosquitto" / "acl", tmp_path / "acl")
    (tmp_path / "db").mkdir()
    conf = (
        (REPO / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
        .replace("/etc/mosquitto/modelfleet/", f"{tmp_path}/")
        .replace("/var/lib/mosquitto/", f"{tmp_path}/db/")
        .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    ) + "user root\n"
    (tmp_path / "example.conf").write_text(conf)
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp_path / "example.conf")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    def listening() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "mosquitto exited"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 10, "the example broker")
        good = Device(port, "dev-x", device_password)
        assert good.connected.wait(10) and good.connack == 0
        bad = Device(port, "dev-x", "wrong")
        assert bad.connected.wait(10) and bad.connack in (4, 5)
        good.close()
        bad.close()
    finally:
        proc.terminate()
        proc.wait(10)
