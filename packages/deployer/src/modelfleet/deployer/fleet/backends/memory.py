"""An in-memory fleet backend: devices are plain records a test (or a demo) moves by hand.

The engine's unit tests drive it; devices "apply" only when told to, so every
rollout path (failure, timeout, offline, telemetry gate) can be stepped exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.deployer.fleet.backends.base import ChangeLog, DeviceInfo, TelemetrySummary


class MemoryFleetBackend:
    """`FleetBackend` over a dict of `DeviceInfo`."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceInfo] = {}
        self._telemetry: list[tuple[str, float, int, int, float | None]] = []
        self._changed = threading.Event()
        self._log = ChangeLog()
        self._next_version = 1
        self.published: list[tuple[str, ModelVersionRef | None, int]] = []

    # ------------------------------------------------------------------ test controls

    def add(self, device_id: str, *, online: bool = True, tags: Mapping[str, str] | None = None) -> None:
        self._devices[device_id] = DeviceInfo(device_id, online=online, last_seen=time.time(), tags=dict(tags or {}))

    def set_online(self, device_id: str, online: bool) -> None:
        self._devices[device_id] = replace(self._devices[device_id], online=online)
        self._log.add(device_id)

    def report(self, device_id: str, status: str, reason: str | None = None, stage: str | None = None) -> None:
        """The device reports on its current desired state."""
        d = self._devices[device_id]
        applied = d.desired_version if status == "applied" else d.applied_version
        # applying a desired state of "serve no model" (desired None) leaves nothing active
        active = d.desired if status == "applied" else None
        keep = status != "applied"
        self._devices[device_id] = replace(
            d,
            status=status,
            report_version=d.desired_version,
            applied_version=applied,
            reason=reason,
            stage=stage,
            active=active.key if active else (d.active if keep else None),
            active_name=active.name if active else (d.active_name if keep else None),
            active_version=active.version if active else (d.active_version if keep else None),
        )
        self._log.add(device_id)
        self._changed.set()

    def add_telemetry(self, device_id: str, requests: int, errors: int, p99_ms: float | None = None) -> None:
        self._telemetry.append((device_id, time.time(), requests, errors, p99_ms))

    # ------------------------------------------------------------------ FleetBackend

    def devices(self) -> list[DeviceInfo]:
        return [self._devices[k] for k in sorted(self._devices)]

    def device(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def set_desired(self, assignments: Mapping[str, ModelVersionRef | None]) -> dict[str, int]:
        out: dict[str, int] = {}
        for device_id, ref in assignments.items():
            version = self._next_version
            self._next_version += 1
            d = self._devices.get(device_id) or DeviceInfo(device_id)
            self._devices[device_id] = replace(d, desired=ref, desired_version=version)
            self.published.append((device_id, ref, version))
            out[device_id] = version
        return out

    def telemetry(
        self, device_ids: Iterable[str], since: float, model: tuple[str, int] | None = None
    ) -> TelemetrySummary:
        wanted = set(device_ids)
        rows = [t for t in self._telemetry if t[0] in wanted and t[1] >= since]
        p99s = [t[4] for t in rows if t[4] is not None]
        return TelemetrySummary(
            requests=sum(t[2] for t in rows),
            errors=sum(t[3] for t in rows),
            p99_ms=max(p99s) if p99s else None,
            devices_reporting=len({t[0] for t in rows}),
        )

    def changed(self, cursor: int | None) -> tuple[int, list[str]]:
        return self._log.read(cursor)

    def wait(self, timeout: float) -> None:
        self._changed.wait(timeout)
        self._changed.clear()

    def close(self) -> None:
        pass
