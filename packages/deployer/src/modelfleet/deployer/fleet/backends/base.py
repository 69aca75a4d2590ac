"""The fleet backend interface: what the rollout engine needs from MQTT, IoT Hub, ...

The engine and the CLI import only this module; a backend turns its wire
protocol into `DeviceInfo` snapshots and desired-state writes. Implementations
keep a live cache of the fleet (presence, desired, reported, telemetry), so
every method here is cheap and never blocks on the network for long.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelfleet.agent.modelref import ModelVersionRef


def redact_url(url: str) -> str:
    """A backend URL as a message or a log may show it: any `user:password@` dropped, also from
    a malformed URL (`user:pw@host` without a scheme, `mqtt//...`) that a parser would not split."""
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme, slashes, _ = head.partition("://")
    return f"{scheme}://{host}" if slashes else host


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the fleet backend last saw it."""

    device_id: str
    online: bool = False
    last_seen: float | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    # the desired state currently held for the device (retained), and its `$version`;
    # `desired` None with a `desired_version` is a desired state of "serve no model"
    desired: ModelVersionRef | None = None
    desired_version: int | None = None
    # the device's last report: which desired `$version` it is about, and how that went
    status: str | None = None  # applying | applied | failed
    report_version: int | None = None
    applied_version: int | None = None
    active: str | None = None  # "name:version" being served
    active_version: int | None = None
    active_name: str | None = None
    reason: str | None = None
    stage: str | None = None

    def outcome(self, desired_version: int) -> str:
        """'applied', 'failed' or 'pending' for the desired `$version` a controller issued."""
        if self.report_version == desired_version:
            if self.status == "applied":
                return "applied"
            if self.status == "failed":
                return "failed"
            return "pending"
        if self.applied_version is not None and self.applied_version >= desired_version:
            return "applied"
        return "pending"

    @property
    def serves_no_model_desired(self) -> bool:
        """Whether the desired state held for the device says "serve no model"."""
        return self.desired is None and self.desired_version is not None

    def document(self) -> dict[str, Any]:
        """The JSON-like document target queries run over (see docs/fleet.md)."""
        return {
            "deviceId": self.device_id,
            "connectionState": "Connected" if self.online else "Disconnected",
            "online": self.online,
            "tags": dict(self.tags),
            "reported": {
                "status": self.status,
                "model": (
                    {"name": self.active_name, "version": self.active_version, "id": self.active}
                    if self.active
                    else {}
                ),
                "reason": self.reason,
            },
            "desired": {
                "model": (
                    {"name": self.desired.name, "version": self.desired.version, "id": self.desired.key}
                    if self.desired
                    else {}
                ),
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "online": self.online,
            "last_seen": self.last_seen,
            "tags": dict(self.tags),
            "model": self.active,
            "status": self.status,
            "desired": self.desired.key if self.desired else None,
            "desired_version": self.desired_version,
            "report_version": self.report_version,
            "error": self.reason if self.status == "failed" else None,
            "stage": self.stage,
        }


@dataclass(frozen=True)
class TelemetrySummary:
    """Scoring health over a set of devices and a time window."""

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None
    devices_reporting: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class FleetBackend(Protocol):
    """A fleet of devices reached through device twins."""

    def devices(self) -> list[DeviceInfo]:
        """Every known device, sorted by id."""

    def device(self, device_id: str) -> DeviceInfo | None:
        """One device, None when it never showed up."""

    def set_desired(self, assignments: Mapping[str, ModelVersionRef | None]) -> dict[str, int]:
        """Publish desired states; None is "serve no model" (the device unloads what it serves).
        Returns the `$version` issued per device."""

    def telemetry(
        self, device_ids: Iterable[str], since: float, model: tuple[str, int] | None = None
    ) -> TelemetrySummary:
        """Health of the devices' scoring in the records received since `since` (this
        machine's clock, epoch seconds), only those serving `model` (name, version) if given."""

    def changed(self, cursor: int | None) -> tuple[int, list[str]]:
        """Devices whose state changed since `cursor` (None: just a fresh cursor), and the new cursor."""

    def wait(self, timeout: float) -> None:
        """Block until something changed in the fleet or `timeout` seconds passed."""

    def close(self) -> None:
        """Flush pending publishes and disconnect."""


class ChangeLog:
    """Device ids in the order their state changed, read from a cursor (one reader)."""

    def __init__(self) -> None:
        self._base = 0  # cursor value of _ids[0]
        self._ids: list[str] = []

    def add(self, device_id: str) -> None:
        self._ids.append(device_id)

    def read(self, cursor: int | None) -> tuple[int, list[str]]:
        end = self._base + len(self._ids)
        if cursor is None:
            return end, []
        if cursor < self._base:
            # older than what is kept: the caller re-reads everything
            return end, list(dict.fromkeys(self._ids))
        out = self._ids[cursor - self._base :]
        if len(self._ids) > 100_000:  # keep the log bounded; the reader is always near the end
            self._base = end
            self._ids = []
        return end, out

