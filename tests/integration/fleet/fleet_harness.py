"""Helpers for the fleet integration tests: real agents (processes), the real registry and
artifact server, the `modelfleet` CLI as a subprocess, and an observer on the broker."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servicekit

from modelfleet.deployer.fleet.backends.base import DeviceInfo
from modelfleet.deployer.fleet.backends.mqtt import MqttFleetBackend, MqttFleetSettings

CLI = [sys.executable, "-c", "from modelfleet.deployer.cli import main; main()"]
TOKEN = "fleet-artifact-token"


wait_until = functools.partial(servicekit.wait_until, interval=0.05)


class Agent:
    """`python -m modelfleet.agent run --config FILE` with its own state folder."""

    def __init__(self, workdir: Path, device_id: str, broker_port: int, tags: dict[str, str] | None = None) -> None:
        self.device_id = device_id
        self.config = workdir / f"{device_id}.toml"
        self.log = workdir / f"{device_id}.log"
        self.config.write_text(
            f'[device]\nid = "{device_id}"\n'
            + "".join(f'tags.{k} = "{v}"\n' for k, v in (tags or {}).items())
            + f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
            f'[store]\ndir = "{workdir / (device_id + "-state")}"\nreserve_mb = 0\ntoken = "{TOKEN}"\n'
            "[scoring]\nport = 0\n"
            "[telemetry]\ninterval_s = 0.3\n"
            "[reconcile]\nretry_initial_s = 0.2\nretry_max_s = 1.0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> Agent:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.agent", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[self._offset:] if self.log.exists() else ""

    @property
    def scoring_port(self) -> int:
        def found() -> re.Match[str] | None:
            return re.search(r"event=agent_started .*scoring_port=(\d+)", self.log_text())

        return int(wait_until(found, 60, f"{self.device_id} to start").group(1))

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Fleet:
    """A broker, the registry + artifact server, agents, and the environment the CLI runs in."""

    workdir: Path
    broker_port: int
    registry: Any
    server: Any
    agents: dict[str, Agent] = field(default_factory=dict)
    observer: MqttFleetBackend | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MODELFLEET_HOME": str(self.registry.home),
            "MODELFLEET_MQTT_URL": f"mqtt://127.0.0.1:{self.broker_port}",
            "MODELFLEET_ARTIFACT_URL": self.server.url,
        }

    def register(self, name: str, path: Path) -> int:
        return int(self.registry.register(name, path).model.version)

    def start_agents(self, count: int, prefix: str = "dev", tags: dict[str, str] | None = None) -> list[Agent]:
        new = [Agent(self.workdir, f"{prefix}-{i:02d}", self.broker_port, tags).start() for i in range(count)]
        for a in new:
            self.agents[a.device_id] = a
        for a in new:
            self.wait_device(a.device_id, lambda d: d.online, "online")
        return new

    def watch(self) -> MqttFleetBackend:
        if self.observer is None:
            settings = MqttFleetSettings(port=self.broker_port)
            self.observer = MqttFleetBackend(settings).connect()
        return self.observer

    def device(self, device_id: str) -> DeviceInfo | None:
        return self.watch().device(device_id)

    def wait_device(self, device_id: str, check: Callable[[DeviceInfo], bool], what: str, timeout: float = 60) -> DeviceInfo:
        def ok() -> DeviceInfo | None:
            d = self.device(device_id)
            return d if d is not None and check(d) else None

        try:
            return wait_until(ok, timeout, f"{device_id} {what}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            agent = self.agents.get(device_id)
            log = agent.log_text()[-2000:] if agent else ""
            raise AssertionError(f"{exc}; device: {self.device(device_id)}\n--- agent log ---\n{log}") from None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "fleet", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def cli_json(self, *args: str, timeout: float = 120) -> Any:
        done = self.cli(*args, "--output", "json", timeout=timeout)
        assert done.stdout.strip(), f"no output (exit {done.returncode}): {done.stderr}"
        return json.loads(done.stdout)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*CLI, "fleet", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> None:
        # a detached controller left by a failing test stops at its next step
        from modelfleet.deployer.fleet.store import ACTIVE_STATES, FleetStore

        store = FleetStore(self.registry.home)
        for r in store.all():
            if r.state in ACTIVE_STATES:
                store.set_state(r.name, "aborted")
        for a in self.agents.values():
            a.kill()
        if self.observer is not None:
            self.observer.close()
        self.server.stop()
