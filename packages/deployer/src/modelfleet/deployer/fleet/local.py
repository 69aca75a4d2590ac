"""A whole fleet on this machine: a broker, the artifact server and agent processes.

Used by the quickstart to show the device side end to end (and handy for demos):
mosquitto on a free loopback port with the at-scale settings, the registry's
artifact server with a random token, and N `modelfleet-agent` processes, each
with its own state folder and scoring port. Everything started is stopped on
exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings
from modelfleet.deployer.fleet.rollout import RolloutEngine, RolloutSpec
from modelfleet.deployer.fleet.store import FleetError, FleetStore
from modelfleet.deployer.registry import ModelVersion, Registry
from modelfleet.deployer.registry.server import ArtifactServer
from modelfleet.deployer.samples import digits_rows
from modelfleet.deployer.targets.base import Progress

QUICKSTART_PREFIX = "quickstart-"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise FleetError(
            "the device side needs an MQTT broker and mosquitto is not installed",
            hint="apt-get install mosquitto (./run.sh quickstart does it), or point MODELFLEET_MQTT_URL at a broker",
        )
    return found


@dataclass
class LocalAgent:
    device_id: str
    scoring_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]


@dataclass
class LocalFleet:
    """Broker + artifact server + agents; a context manager."""

    registry: Registry
    workdir: Path
    devices: int = 3
    progress: Progress = print
    prefix: str = "quickstart-dev"
    broker: subprocess.Popen[bytes] | None = None
    broker_port: int = 0
    server: ArtifactServer | None = None
    agents: list[LocalAgent] = field(default_factory=list)
    backend: MqttFleetBackend | None = None

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker_port = _free_port()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_inflight_messages 0\n"
        )
        self.broker = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not _wait_port(self.broker_port, 10):
            raise FleetError(f"mosquitto did not start on 127.0.0.1:{self.broker_port}")
        self.progress(f"started an MQTT broker (mosquitto) on 127.0.0.1:{self.broker_port}")
        self.server = ArtifactServer(self.registry, token=secrets.token_urlsafe(24)).start()
        self.progress(f"started the artifact server at {self.server.url}")
        for i in range(self.devices):
            self.agents.append(self._start_agent(f"{self.prefix}-{i}"))
        self.backend = MqttFleetBackend(MqttFleetSettings(port=self.broker_port)).connect()
        deadline = time.monotonic() + 90
        for agent in self.agents:
            while not ((d := self.backend.device(agent.device_id)) and d.online):
                if agent.proc.poll() is not None or time.monotonic() > deadline:
                    tail = agent.log.read_text(errors="replace")[-1500:] if agent.log.exists() else ""
                    raise FleetError(f"agent {agent.device_id} did not come online:\n{tail}")
                self.backend.wait(0.2)
        self.progress(f"{self.devices} device agents online: " + ", ".join(a.device_id for a in self.agents))

    def _start_agent(self, device_id: str) -> LocalAgent:
        assert self.server is not None
        state = self.workdir / device_id
        state.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        config = state / "agent.toml"
        config.write_text(
            f'[device]\nid = "{device_id}"\ntags.site = "quickstart"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.broker_port}\n'
            f"[store]\ndir = {json.dumps(str(state / 'store'))}\nreserve_mb = 0\n"
            f"token = {json.dumps(self.server.token)}\n"
            f'[scoring]\nhost = "127.0.0.1"\nport = {port}\n'
            "[telemetry]\ninterval_s = 1.0\n"
        )
        log = state / "agent.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.agent", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return LocalAgent(device_id, port, config, log, proc)

    def stop(self) -> None:
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.backend.close()
            self.backend = None
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.terminate()
        for agent in self.agents:
            try:
                agent.proc.wait(15)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(5)
        self.agents = []
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.broker is not None:
            if self.broker.poll() is None:
                self.broker.terminate()
                try:
                    self.broker.wait(5)
                except subprocess.TimeoutExpired:
                    self.broker.kill()
                    self.broker.wait(5)
            self.broker = None


@dataclass
class DeviceQuickstart:
    """What the device side of the quickstart did."""

    devices: list[str] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "rollouts": self.rollouts, "calls": self.calls, "states": self.states}


def _call_device(agent: LocalAgent, progress: Progress) -> dict[str, Any]:
    started = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{agent.scoring_port}/score", json={"data": digits_rows(3)}, timeout=30)
    elapsed = (time.perf_counter() - started) * 1000
    if r.status_code != 200:
        raise FleetError(f"calling {agent.device_id} failed: HTTP {r.status_code} {r.text[:200]}")
    body = r.json()
    labels = body.get("label") if isinstance(body, dict) else body
    version = r.headers.get("x-model-version")
    progress(f"called {agent.device_id} on 127.0.0.1:{agent.scoring_port}: model version {version}, labels {labels}")
    return {"device": agent.device_id, "model_version": version, "labels": labels, "elapsed_ms": round(elapsed, 2)}


def _roll(
    engine: RolloutEngine, name: str, model: ModelVersion, fleet: LocalFleet, stages: tuple[int, ...], progress: Progress
) -> dict[str, Any]:
    assert fleet.server is not None
    ref = fleet.registry.model_ref(model, fleet.server.url)
    engine.create(RolloutSpec(name, ref, target="tags.site = 'quickstart'", stages=stages, timeout_s=120))
    progress(f"rollout {name}: {model.key} to {fleet.devices} devices in stages {list(stages)}")

    reported = [0]  # stage results already shown

    def show(r: Any) -> None:
        for entry in r.stage_log[reported[0]:]:
            progress(f"  stage {entry['stage']} ({entry['percent']}%, {entry['devices']} device{'' if entry['devices'] == 1 else 's'}): "
                     f"{entry['result']} in {entry['seconds']:.2f}s")
        reported[0] = len(r.stage_log)

    final = engine.drive(name, on_step=show)
    if final.state != "succeeded":
        raise FleetError(f"rollout {name} {final.state}: {final.reason}")
    return {"name": name, "model": model.key, "state": final.state, "stages": final.stage_log}


def run_device_quickstart(
    registry: Registry, v1: ModelVersion, v2: ModelVersion, workdir: Path, progress: Progress = print, devices: int = 3
) -> DeviceQuickstart:
    """Broker + artifact server + agents; roll v1 out, call a device, roll v2 out in two stages, call again."""
    summary = DeviceQuickstart()
    store = FleetStore(registry.home)
    # an interrupted earlier run may have left a quickstart rollout holding these devices
    for r in store.all():
        if r.name.startswith(QUICKSTART_PREFIX) and r.active:
            store.set_state(r.name, "aborted")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with LocalFleet(registry, workdir, devices=devices, progress=progress) as fleet:
        assert fleet.backend is not None
        summary.devices = [a.device_id for a in fleet.agents]
        engine = RolloutEngine(store, fleet.backend)
        summary.rollouts.append(_roll(engine, f"{QUICKSTART_PREFIX}{stamp}-v1", v1, fleet, (100,), progress))
        summary.calls.append(_call_device(fleet.agents[0], progress))
        summary.rollouts.append(_roll(engine, f"{QUICKSTART_PREFIX}{stamp}-v2", v2, fleet, (1, 100), progress))
        summary.calls.append(_call_device(fleet.agents[0], progress))
        summary.states = [
            {"device": d.device_id, "online": d.online, "model": d.active, "status": d.status}
            for d in fleet.backend.devices()
        ]
    progress("stopped the device agents, the artifact server and the broker")
    return summary
