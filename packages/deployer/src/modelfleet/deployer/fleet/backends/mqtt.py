"""The MQTT fleet backend: the twin protocol (`modelfleet.agent.protocol`) seen from the controller.

One paho client subscribes to every device's retained presence, desired and
reported state and to telemetry, and keeps a live `DeviceInfo` per device.
On connect it waits until the broker has replayed every retained message (a
sentinel published to ourselves after the subscriptions comes back last), so
the first `devices()` call already sees the whole fleet.

Broker limits this respects (see the MQTT-at-scale note): no client-side
in-flight cap, so thousands of desired states go out in one burst; the broker
needs `max_queued_messages` large or 0 for the controller's replies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from modelfleet.agent.errors import ProtocolError
from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import (
    DEFAULT_PREFIX,
    RESERVED_ID_PREFIX,
    DesiredState,
    Presence,
    ReportedState,
    TelemetryBatch,
    fleet_topic,
)
from modelfleet.agent.telemetry import percentile
from modelfleet.deployer.fleet.backends.base import (
    ChangeLog,
    DeviceInfo,
    TelemetrySummary,
    redact_url,
)
from modelfleet.deployer.fleet.store import FleetError

log = logging.getLogger("modelfleet.fleet.mqtt")

_KEEP_RECORDS = 256  # telemetry records kept per device: enough for a soak window


@dataclass(frozen=True)
class MqttFleetSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    prefix: str = DEFAULT_PREFIX
    connect_timeout_s: float = 10.0

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> MqttFleetSettings:
        """`mqtt://[user:password@]host[:port]` or `mqtts://...`."""
        parts = urlsplit(url)
        # an error never shows a password (it may have come from a file or the environment)
        shown = redact_url(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FleetError(
                f"broker URL {shown!r} is not mqtt://host[:port] or mqtts://host[:port]",
                hint="e.g. --broker mqtt://127.0.0.1:1883 (or set MODELFLEET_MQTT_URL)",
            )
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError:
            raise FleetError(f"broker URL {shown!r} has an invalid port") from None
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "mqtts",
            prefix=prefix,
        )

    @property
    def url(self) -> str:
        """The URL without credentials (safe to store and log)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class _Telemetry:
    ts: float
    received: float
    model: tuple[str, int] | None
    requests: int
    errors: int
    buckets: tuple[float, ...] | None
    counts: list[int] | None
    p99_s: float | None


class MqttFleetBackend:
    """`FleetBackend` over an MQTT broker speaking twin protocol v1."""

    def __init__(self, settings: MqttFleetSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._devices: dict[str, DeviceInfo] = {}
        self._log = ChangeLog()
        self._echo: dict[str, bytes] = {}  # desired payloads we published, until the broker echoes them
        self._telemetry: dict[str, deque[_Telemetry]] = {}
        self._last_seq: dict[str, int] = {}
        self._sync_topic = f"{settings.prefix}/_sync/{uuid.uuid4().hex}"
        self._synced = threading.Event()
        self._connected = threading.Event()
        self._connect_rc: int | None = None
        self._acks: dict[int, threading.Event] = {}
        self._acked: set[int] = set()
        self._ack_lock = threading.Lock()
        self._all_acked = threading.Condition(self._ack_lock)
        self._unacked = 0
        self.client = mqtt.Client(
            client_id=f"{RESERVED_ID_PREFIX}-{uuid.uuid4().hex[:12]}", clean_session=True, protocol=mqtt.MQTTv311
        )
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set()
        self.client.max_inflight_messages_set(0)  # 0: unlimited; thousands of desired states per burst
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._sub_mid: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> MqttFleetBackend:
        s = self.settings
        try:
            self.client.connect(s.host, s.port, keepalive=30)
        except OSError as exc:
            raise FleetError(
                f"cannot reach the MQTT broker at {s.url}: {exc.strerror or exc}",
                hint="start the broker, or point --broker / MODELFLEET_MQTT_URL at it",
            ) from None
        self.client.loop_start()
        deadline = time.monotonic() + s.connect_timeout_s
        # the event is set by a CONNACK either way: a refusal (bad credentials) must be
        # reported as such, not as the sync below timing out
        if not self._connected.wait(max(0.0, deadline - time.monotonic())) or self._connect_rc:
            self.close()
            rc = self._connect_rc
            why = mqtt.connack_string(rc) if rc else "no answer"
            raise FleetError(
                f"the MQTT broker at {s.url} refused the connection: {why}",
                hint=(
                    "check the user and password in --broker mqtt://user:password@host:port (or MODELFLEET_MQTT_URL); "
                    "the password may also come from --broker-password-file or MODELFLEET_BROKER_PASSWORD"
                ),
            )
        if not self._synced.wait(max(0.0, deadline - time.monotonic())):
            self.close()
            raise FleetError(f"the MQTT broker at {s.url} did not replay the fleet state in time")
        return self

    def close(self) -> None:
        self.flush(5.0)
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttFleetBackend:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paho thread

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        self._connect_rc = rc
        if rc != 0:
            self._connected.set()
            return
        p = self.settings.prefix
        topics = [(fleet_topic(k, p), 1) for k in ("presence", "desired", "reported", "telemetry")]
        _, self._sub_mid = client.subscribe([*topics, (self._sync_topic, 1)])
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, granted: Any) -> None:
        if mid == self._sub_mid:
            # retained messages for the subscriptions are queued before this; ours comes after them
            client.publish(self._sync_topic, b"sync", qos=1)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int) -> None:
        with self._ack_lock:
            self._acked.add(mid)
            self._all_acked.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic == self._sync_topic:
            self._synced.set()
            return
        head = self.settings.prefix + "/"
        rest = topic[len(head):] if topic.startswith(head) else ""
        device_id, _, kind = rest.partition("/")
        if not device_id or not kind:
            return
        try:
            self._apply(device_id, kind, bytes(msg.payload))
        except ProtocolError as exc:
            log.warning("event=bad_message device=%s kind=%s reason=%r", device_id, kind, str(exc))
        except Exception as exc:  # one odd message must not kill paho's network thread
            log.warning("event=bad_message device=%s kind=%s reason=%r", device_id, kind, repr(exc))

    def _apply(self, device_id: str, kind: str, payload: bytes) -> None:
        if kind == "telemetry":
            self._apply_telemetry(device_id, payload)
            return
        with self._lock:
            d = self._devices.get(device_id) or DeviceInfo(device_id)
            if kind == "presence":
                if not payload:
                    return
                p = Presence.decode(payload)
                d = replace(
                    d,
                    online=p.online,
                    last_seen=max(d.last_seen or 0.0, p.ts or time.time()),
                    # tags come with the birth message; the last will carries none
                    tags=p.tags if p.tags is not None else d.tags,
                )
            elif kind == "desired":
                if self._echo.pop(device_id, None) == payload:
                    return  # our own publish coming back: already applied to our view
                if not payload:  # cleared: nothing desired
                    d = replace(d, desired=None, desired_version=None)
                else:
                    s = DesiredState.decode(payload)
                    d = replace(d, desired=s.model, desired_version=s.version)
            elif kind == "reported":
                if not payload:
                    return
                r = ReportedState.decode(payload)
                d = replace(
                    d,
                    status=r.status,
                    report_version=r.version,
                    applied_version=r.applied_version,
                    active=f"{r.active.name}:{r.active.version}" if r.active else None,
                    active_name=r.active.name if r.active else None,
                    active_version=r.active.version if r.active else None,
                    reason=r.reason,
                    stage=r.stage,
                    last_seen=max(d.last_seen or 0.0, r.updated_at or 0.0) or None,
                )
            else:
                return
            self._devices[device_id] = d
            self._log.add(device_id)
            self._changed.notify_all()

    def _apply_telemetry(self, device_id: str, payload: bytes) -> None:
        batch = TelemetryBatch.decode(payload)
        now = time.time()
        with self._lock:
            keep = self._telemetry.setdefault(device_id, deque(maxlen=_KEEP_RECORDS))
            last = self._last_seq.get(device_id, 0)
            latest_ts = 0.0
            for rec in batch.records:
                if not isinstance(rec, dict):
                    continue
                seq = rec.get("seq")
                if isinstance(seq, int):
                    if seq <= last:
                        continue  # at-least-once delivery: a duplicate
                    last = seq
                lat = rec.get("latency") if isinstance(rec.get("latency"), dict) else {}
                assert isinstance(lat, dict)
                buckets, counts, p99 = lat.get("buckets"), lat.get("counts"), lat.get("p99")
                ts = float(rec.get("ts") or now)
                latest_ts = max(latest_ts, ts)
                served = rec.get("model")
                keep.append(
                    _Telemetry(
                        ts=ts,
                        received=now,
                        model=_served(served),
                        requests=int(rec.get("requests") or 0),
                        errors=int(rec.get("errors") or 0),
                        buckets=tuple(buckets) if isinstance(buckets, list) else None,
                        counts=list(counts) if isinstance(counts, list) else None,
                        p99_s=float(p99) if isinstance(p99, int | float) else None,
                    )
                )
            self._last_seq[device_id] = last
            d = self._devices.get(device_id)
            if d is not None and latest_ts:
                self._devices[device_id] = replace(d, last_seen=max(d.last_seen or 0.0, latest_ts))
            self._changed.notify_all()

    # ------------------------------------------------------------------ FleetBackend

    def devices(self) -> list[DeviceInfo]:
        with self._lock:
            return [self._devices[k] for k in sorted(self._devices)]

    def device(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def set_desired(self, assignments: Mapping[str, ModelVersionRef | None]) -> dict[str, int]:
        """Publish retained desired states and wait for the broker to acknowledge them all."""
        base = int(time.time() * 1000)  # `$version` grows across controllers and restarts
        out: dict[str, int] = {}
        mids: list[int] = []
        now = time.time()
        # the same object for every device but `$version`: build it once (what
        # DesiredState.encode writes), not 10,000 times
        templates: dict[int, dict[str, Any]] = {}
        for device_id, ref in assignments.items():
            topic = f"{self.settings.prefix}/{device_id}/desired"
            d = self._devices.get(device_id)
            version = max(base, (d.desired_version or 0) + 1 if d else 1)
            # None: "model": null, serve no model (twin protocol); templates[id(None)] serves them all
            doc = templates.get(id(ref))
            if doc is None:
                doc = templates[id(ref)] = DesiredState(version, ref, issued_at=now).to_dict()
            doc["$version"] = version
            payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            with self._lock:
                self._echo[device_id] = payload
            info = self.client.publish(topic, payload, qos=1, retain=True)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise FleetError(f"publishing the desired state of {device_id!r} failed: {mqtt.error_string(info.rc)}")
            mids.append(info.mid)
            out[device_id] = version
            # our own view, before the broker echoes it back
            with self._lock:
                cur = self._devices.get(device_id) or DeviceInfo(device_id)
                self._devices[device_id] = replace(cur, desired=ref, desired_version=version)
        self._wait_acks(mids, timeout=30.0)
        return out

    def _wait_acks(self, mids: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._ack_lock:
            pending = set(mids)
            while True:
                pending -= self._acked
                if not pending:
                    self._acked.difference_update(mids)
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(
                        f"the MQTT broker at {self.settings.url} did not acknowledge "
                        f"{len(pending)} of {len(mids)} desired states within {timeout:g}s"
                    )
                self._all_acked.wait(left)

    def flush(self, timeout: float) -> None:
        """Best effort: let queued publishes leave before disconnecting."""
        deadline = time.monotonic() + timeout
        while self.client.want_write() and time.monotonic() < deadline:
            time.sleep(0.01)

    def telemetry(
        self, device_ids: Iterable[str], since: float, model: tuple[str, int] | None = None
    ) -> TelemetrySummary:
        requests = errors = reporting = 0
        hist: list[int] | None = None
        bounds: tuple[float, ...] | None = None
        worst_p99: float | None = None
        mergeable = True
        with self._lock:
            for device_id in device_ids:
                # receive time, not the device's clock (it may be off); and only intervals that
                # ended serving the version under test, not the one it replaced
                recs = [
                    r
                    for r in self._telemetry.get(device_id, ())
                    if r.received >= since and (model is None or r.model == model)
                ]
                if recs:
                    reporting += 1
                for r in recs:
                    requests += r.requests
                    errors += r.errors
                    if r.p99_s is not None and r.requests:
                        worst_p99 = max(worst_p99 or 0.0, r.p99_s)
                    if r.buckets is None or r.counts is None or not r.requests:
                        continue
                    if bounds is None:
                        bounds, hist = r.buckets, list(r.counts)
                    elif r.buckets == bounds and hist is not None and len(r.counts) == len(hist):
                        hist = [a + b for a, b in zip(hist, r.counts, strict=True)]
                    else:
                        mergeable = False
        p99: float | None
        if mergeable and bounds and hist is not None and sum(hist):
            p99 = percentile(list(bounds), hist, 0.99)
        else:
            p99 = worst_p99
        return TelemetrySummary(
            requests=requests,
            errors=errors,
            p99_ms=p99 * 1000 if p99 is not None else None,
            devices_reporting=reporting,
        )

    def changed(self, cursor: int | None) -> tuple[int, list[str]]:
        with self._lock:
            return self._log.read(cursor)

    def wait(self, timeout: float) -> None:
        with self._lock:
            self._changed.wait(timeout)


def _served(model: Any) -> tuple[str, int] | None:
    """(name, version) of a telemetry record's `model`, None when absent or not a model version."""
    if not isinstance(model, dict):
        return None
    try:
        return str(model.get("name")), int(model.get("version"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None

