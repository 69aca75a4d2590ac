"""Helpers for the device agent's integration tests: a controller speaking the twin protocol,
agents as subprocesses, the registry handle."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import servicekit

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import (
    CommandRequest,
    CommandResponse,
    DesiredState,
    Presence,
    ReportedState,
    TelemetryBatch,
    device_of,
)

REPO = Path(__file__).resolve().parents[3]


wait_until = functools.partial(servicekit.wait_until, interval=0.02)


@dataclass
class RegistryHandle:
    registry: Any
    server: Any
    token: str

    def register(self, name: str, path: Path, *, sign_key: Path | None = None) -> ModelVersionRef:
        result = self.registry.register(name, path, sign_key=sign_key)
        return self.registry.model_ref(result.model, self.server.url)  # type: ignore[no-any-return]


@dataclass
class Controller:
    """The fleet side: publishes desired states and commands, records everything devices send."""

    port: int
    username: str | None = None
    password: str | None = None
    reported: dict[str, list[ReportedState]] = field(default_factory=dict)
    presence: dict[str, list[Presence]] = field(default_factory=dict)
    telemetry: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    responses: dict[str, CommandResponse] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)  # responses received, by command id
    client: mqtt.Client | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    desired_version: int = 0
    #: a persistent session: the broker keeps QoS 1 messages for the controller while it is away
    durable: bool = False
    ca_file: Path | None = None  # TLS to the broker, trusting this CA

    def start(self) -> Controller:
        client = mqtt.Client(client_id=f"controller-{uuid.uuid4().hex[:8]}", clean_session=not self.durable)
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.ca_file is not None:
            client.tls_set(ca_certs=str(self.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
            c.subscribe("modelfleet/v1/#", qos=1)
            subscribed.set()

        client.on_connect = on_connect
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10), "controller did not connect"
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device, kind = device_of(msg.topic)
        with self.lock:
            if kind == "reported" and msg.payload:
                self.reported.setdefault(device, []).append(ReportedState.decode(msg.payload))
            elif kind == "presence" and msg.payload:
                self.presence.setdefault(device, []).append(Presence.decode(msg.payload))
            elif kind == "telemetry":
                self.telemetry.setdefault(device, []).extend(TelemetryBatch.decode(msg.payload).records)
            elif kind == "responses":
                response = CommandResponse.decode(msg.payload)
                self.responses[response.id] = response
                self.answers[response.id] = self.answers.get(response.id, 0) + 1

    def desire(self, device: str, ref: ModelVersionRef | None, version: int | None = None) -> int:
        """Publish a desired state (`ref` None: serve no model); its `$version`."""
        self.desired_version = version if version is not None else self.desired_version + 1
        payload = DesiredState(self.desired_version, ref).encode()
        self.publish_raw(f"modelfleet/v1/{device}/desired", payload, retain=True)
        return self.desired_version

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def last_reported(self, device: str) -> ReportedState | None:
        with self.lock:
            reports = self.reported.get(device) or []
            return reports[-1] if reports else None

    def wait_reported(
        self, device: str, version: int | None, status: str, timeout: float = 30.0
    ) -> ReportedState:
        def match() -> ReportedState | None:
            last = self.last_reported(device)
            if last is not None and last.version == version and last.status == status:
                return last
            return None

        try:
            return wait_until(match, timeout, f"{device} to report {status} for $version {version}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last report: {self.last_reported(device)}") from None

    def command(self, device: str, name: str, timeout: float = 30.0, **args: Any) -> CommandResponse:
        request = CommandRequest(uuid.uuid4().hex, name, args)
        self.publish_raw(f"modelfleet/v1/{device}/commands", request.encode())
        return wait_until(lambda: self.responses.get(request.id), timeout, f"response to {name}")  # type: ignore[no-any-return]

    def telemetry_records(self, device: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.telemetry.get(device, []))


class AgentProcess:
    """`python -m modelfleet.agent run --config FILE` as a subprocess, with its log."""

    def __init__(self, workdir: Path, device_id: str, broker_port: int, **settings: Any) -> None:
        self.workdir = workdir
        self.device_id = device_id
        self.config = workdir / f"{device_id}.toml"
        self.log = workdir / f"{device_id}.log"
        self.store_dir = workdir / f"{device_id}-state"
        sections: dict[str, dict[str, Any]] = {
            "device": {"id": device_id},
            "broker": {"host": "127.0.0.1", "port": broker_port},
            "store": {"dir": str(self.store_dir), "reserve_mb": 0, "token": "artifact-token"},
            "scoring": {"port": 0},
            "telemetry": {"interval_s": 0.5},
            "reconcile": {"retry_initial_s": 0.2, "retry_max_s": 1.0},
        }
        self.sections = sections
        self.reconfigure(**settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def reconfigure(self, **settings: Any) -> None:
        """Change settings (`section_key=value`, None removes) for the next start."""
        for key, value in settings.items():
            section, _, name = key.partition("_")
            if value is None:
                self.sections.get(section, {}).pop(name, None)
            else:
                self.sections.setdefault(section, {})[name] = value
        self.config.write_text(_toml(self.sections))

    def start(self) -> AgentProcess:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelfleet.agent", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[self._log_offset:] if self.log.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return re.search(pattern, self.log_text())

        try:
            return wait_until(found, timeout, f"agent log {pattern!r}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log_text()[-3000:]}") from None

    @property
    def scoring_port(self) -> int:
        return int(self.wait_log(r"event=agent_started .*scoring_port=(\d+)").group(1))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"



class StallingArtifactServer:
    """Serves one artifact (single Range requests honoured); the first response sends `stall_after`
    body bytes, then goes silent with the connection open until `release()` (a server that hangs)."""

    def __init__(self, data: bytes, stall_after: int) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.stall_after: int | None = stall_after
        self.ranges: list[str | None] = []
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/artifacts/{self.sha256}"

    def ref(self, name: str, version: int) -> ModelVersionRef:
        return ModelVersionRef(name=name, version=version, url=self.url, sha256=self.sha256, size=len(self.data))

    def start(self) -> StallingArtifactServer:
        self._thread.start()
        return self

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                body = outer.data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.stall_after is not None:
                    head, outer.stall_after = body[: outer.stall_after], None
                    self.wfile.write(head)
                    self.wfile.flush()
                    outer._release.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler
