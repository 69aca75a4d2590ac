"""The twin protocol over MQTT (version 1): topic layout and typed messages.

Both sides import this module: the agent on the device and the deployer's fleet
rollout code. It depends only on the standard library and msgpack (imported
lazily), so encoding thousands of desired states costs no paho or onnxruntime
import. The wire format is documented in docs/twin-protocol.md.

Encoding: desired state, reported state, presence, commands and responses are
UTF-8 JSON objects (small, human-readable in any MQTT tool, the same shape as
an IoT Hub twin's properties); telemetry is a msgpack batch (compact, sent
every interval by every device).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ProtocolError
from .modelref import ModelRefError, ModelVersionRef

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "modelfleet/v1"

ApplyStatus = Literal["applying", "applied", "failed"]
APPLY_STATUSES: tuple[str, ...] = ("applying", "applied", "failed")
COMMANDS: tuple[str, ...] = ("get-state", "rollback", "restart-model")

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
#: the fleet controller's MQTT client ids start with this (`modelfleet-controller-<hex>`); a device
#: with such an id (= its client id) would take over the controller's session or be kicked by it
RESERVED_ID_PREFIX = "modelfleet-controller"


def check_device_id(device_id: str) -> str:
    """A device id is its MQTT user name, client id and one topic level: no '/', '+', '#' or
    spaces, and not a name reserved for the fleet controller."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        special = sorted({c for c in str(device_id) if c in "/+#"})
        why = f" ({', '.join(repr(c) for c in special)}: MQTT topic separator or wildcard)" if special else ""
        raise ProtocolError(
            f"device id {device_id!r} is invalid{why}: use 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    if device_id.lower().startswith(RESERVED_ID_PREFIX):
        raise ProtocolError(
            f"device id {device_id!r} is reserved: ids starting with {RESERVED_ID_PREFIX!r} are the fleet "
            "controller's MQTT client ids"
        )
    return device_id


@dataclass(frozen=True)
class Topics:
    """The topics of one device. `prefix/{device_id}/{kind}`; the ACL grants a device only its own."""

    device_id: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_device_id(self.device_id)

    def _t(self, kind: str) -> str:
        return f"{self.prefix}/{self.device_id}/{kind}"

    @property
    def desired(self) -> str:
        return self._t("desired")

    @property
    def reported(self) -> str:
        return self._t("reported")

    @property
    def presence(self) -> str:
        return self._t("presence")

    @property
    def telemetry(self) -> str:
        return self._t("telemetry")

    @property
    def commands(self) -> str:
        return self._t("commands")

    @property
    def responses(self) -> str:
        return self._t("responses")


def fleet_topic(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A wildcard subscription over every device, e.g. `fleet_topic("reported")`."""
    return f"{prefix}/+/{kind}"


def device_of(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """(device_id, kind) of a protocol topic; ProtocolError for a foreign topic."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise ProtocolError(f"topic {topic!r} is not under {prefix!r}")
    parts = topic[len(head):].split("/")
    if len(parts) != 2:
        raise ProtocolError(f"topic {topic!r} is not {prefix}/<device>/<kind>")
    return parts[0], parts[1]


# --- decoding helpers -----------------------------------------------------------------


def _load_json(payload: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    proto = data.get("protocol", PROTOCOL_VERSION)
    if proto != PROTOCOL_VERSION:
        raise ProtocolError(f"{what}: protocol {proto!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    return data


def _dump_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _int(data: dict[str, Any], key: str, what: str, *, minimum: int = 0) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProtocolError(f"{what}: {key!r} must be an integer >= {minimum}")
    return value


def _num(data: dict[str, Any], key: str, what: str) -> float:
    value = data.get(key)
    if value is None:  # absent or null: not stamped
        return 0.0
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{what}: {key!r} must be a number")
    return float(value)


def _opt_str(data: dict[str, Any], key: str, what: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{what}: {key!r} must be a string")
    return value


def _ref(value: Any, what: str) -> ModelVersionRef:
    try:
        return ModelVersionRef.from_dict(value)
    except (ModelRefError, TypeError) as exc:
        raise ProtocolError(f"{what}: {exc}") from None


# --- messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredState:
    """What a device should run. Retained on `desired`; a higher `$version` supersedes a lower one.

    `model` None (JSON null) means "serve no model": the device unloads what it serves
    and keeps it as `previous` for a rollback.
    """

    version: int
    model: ModelVersionRef | None
    issued_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "$version": self.version,
            "model": self.model.to_dict() if self.model is not None else None,
            "issued_at": self.issued_at or time.time(),
        }

    def encode(self) -> bytes:
        return _dump_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DesiredState:
        what = "desired state"
        version = _int(data, "$version", what, minimum=1)
        if "model" not in data:
            raise ProtocolError(f"{what}: missing field 'model'")
        issued = data.get("issued_at", 0.0)
        if not isinstance(issued, int | float) or isinstance(issued, bool):
            raise ProtocolError(f"{what}: 'issued_at' must be a number")
        model = data["model"]
        return cls(
            version=version, model=_ref(model, what) if model is not None else None, issued_at=float(issued)
        )

    @classmethod
    def decode(cls, payload: bytes | str) -> DesiredState:
        return cls.from_dict(_load_json(payload, "desired state"))

    @staticmethod
    def version_of(payload: bytes | str) -> int | None:
        """The `$version` of a desired state that did not decode, if it has a usable one
        (a `failed` report about an invalid desired state carries it, else null)."""
        try:
            version = json.loads(payload).get("$version")
        except (ValueError, AttributeError):
            return None
        return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None


@dataclass(frozen=True)
class ActiveModel:
    """The model version a device serves (a short form of its `ModelVersionRef`)."""

    name: str
    version: int
    sha256: str

    @classmethod
    def of(cls, ref: ModelVersionRef) -> ActiveModel:
        return cls(ref.name, ref.version, ref.sha256)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> ActiveModel:
        if not isinstance(data, dict):
            raise ProtocolError(f"{what}: expected an object")
        name, version, sha = data.get("name"), data.get("version"), data.get("sha256")
        if not isinstance(name, str) or not isinstance(version, int) or not isinstance(sha, str):
            raise ProtocolError(f"{what}: needs 'name' (string), 'version' (int), 'sha256' (string)")
        return cls(name, version, sha)


@dataclass(frozen=True)
class ReportedState:
    """What a device did with a desired state. Retained on `reported`.

    `version` is the desired `$version` this report is about; `applied_version`
    the last desired `$version` fully applied; `stage`/`reason` say where and why
    a `failed` (or in-progress `applying`) report stands.
    """

    device_id: str
    version: int | None
    status: ApplyStatus
    active: ActiveModel | None = None
    previous: ActiveModel | None = None
    applied_version: int | None = None
    stage: str | None = None
    reason: str | None = None
    attempt: int = 0
    updated_at: float = 0.0
    agent_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "device_id": self.device_id,
            "$version": self.version,
            "status": self.status,
            "active": self.active.to_dict() if self.active else None,
            "previous": self.previous.to_dict() if self.previous else None,
            "applied_version": self.applied_version,
            "updated_at": self.updated_at or time.time(),
        }
        if self.stage is not None:
            data["stage"] = self.stage
        if self.reason is not None:
            data["reason"] = self.reason
        if self.attempt:
            data["attempt"] = self.attempt
        if self.agent_version:
            data["agent_version"] = self.agent_version
        return data

    def encode(self) -> bytes:
        return _dump_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportedState:
        what = "reported state"
        device_id = data.get("device_id")
        if not isinstance(device_id, str):
            raise ProtocolError(f"{what}: 'device_id' must be a string")
        status = data.get("status")
        if status not in APPLY_STATUSES:
            raise ProtocolError(f"{what}: 'status' must be one of {', '.join(APPLY_STATUSES)}")
        version = data.get("$version")
        if version is not None:
            version = _int(data, "$version", what, minimum=1)
        applied = data.get("applied_version")
        if applied is not None:
            applied = _int(data, "applied_version", what, minimum=1)
        active = data.get("active")
        previous = data.get("previous")
        return cls(
            device_id=device_id,
            version=version,
            status=status,
            active=ActiveModel.from_dict(active, f"{what}: active") if active is not None else None,
            previous=ActiveModel.from_dict(previous, f"{what}: previous") if previous is not None else None,
            applied_version=applied,
            stage=_opt_str(data, "stage", what),
            reason=_opt_str(data, "reason", what),
            attempt=_int(data, "attempt", what) if data.get("attempt") is not None else 0,
            updated_at=_num(data, "updated_at", what),
            agent_version=_opt_str(data, "agent_version", what) or "",
        )

    @classmethod
    def decode(cls, payload: bytes | str) -> ReportedState:
        return cls.from_dict(_load_json(payload, "reported state"))


@dataclass(frozen=True)
class Presence:
    """Retained on `presence`: `online=True` at connect (birth); the broker publishes the
    `online=False` last will when the device vanishes, the agent itself on a clean stop."""

    device_id: str
    online: bool
    ts: float = 0.0
    agent_version: str = ""
    clean: bool = False
    #: tags the device declares for fleet targeting (in every presence message), e.g. {"site": "plant-1"}
    tags: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "device_id": self.device_id,
            "online": self.online,
        }
        if self.tags is not None:
            data["tags"] = self.tags
        # the last will is composed at connect time, so its ts would be stale: leave it out
        if self.ts:
            data["ts"] = self.ts
        if self.agent_version:
            data["agent_version"] = self.agent_version
        if self.clean:
            data["clean"] = True
        return data

    def encode(self) -> bytes:
        return _dump_json(self.to_dict())

    @classmethod
    def decode(cls, payload: bytes | str) -> Presence:
        data = _load_json(payload, "presence")
        device_id, online = data.get("device_id"), data.get("online")
        if not isinstance(device_id, str) or not isinstance(online, bool):
            raise ProtocolError("presence: needs 'device_id' (string) and 'online' (bool)")
        tags = data.get("tags")
        if tags is not None and not isinstance(tags, dict):
            raise ProtocolError("presence: 'tags' must be an object")
        return cls(
            device_id,
            online,
            _num(data, "ts", "presence"),
            _opt_str(data, "agent_version", "presence") or "",
            data.get("clean") is True,
            tags,
        )


@dataclass(frozen=True)
class CommandRequest:
    """A command to one device on `commands`; answered on `responses` with the same `id`.

    `issued_at` (unix seconds, stamped by `encode`) lets a device that receives a command
    late, from its persistent session after being offline, answer `expired` instead of
    acting on it; 0 (absent on the wire) means unknown: never expired.
    """

    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    issued_at: float = 0.0

    def encode(self) -> bytes:
        return _dump_json({
            "protocol": PROTOCOL_VERSION, "id": self.id, "name": self.name, "args": self.args,
            "issued_at": self.issued_at or time.time(),
        })

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the command was issued (None when it carries no `issued_at`)."""
        if not self.issued_at:
            return None
        return (time.time() if now is None else now) - self.issued_at

    @classmethod
    def decode(cls, payload: bytes | str) -> CommandRequest:
        what = "command"
        data = _load_json(payload, what)
        cid, name, args = data.get("id"), data.get("name"), data.get("args", {})
        if not isinstance(cid, str) or not cid:
            raise ProtocolError(f"{what}: 'id' must be a non-empty string")
        if not isinstance(name, str):
            raise ProtocolError(f"{what}: 'name' must be a string")
        if not isinstance(args, dict):
            raise ProtocolError(f"{what}: 'args' must be an object")
        return cls(cid, name, args, _num(data, "issued_at", what))

    @staticmethod
    def id_of(payload: bytes | str) -> str:
        """The `id` of a command that did not decode, if it has a usable one, else "" (the
        error response then carries it, so the controller waiting on that id hears why)."""
        try:
            cid = json.loads(payload).get("id")
        except (ValueError, AttributeError):
            return ""
        return cid if isinstance(cid, str) else ""


@dataclass(frozen=True)
class CommandResponse:
    """The answer to a `CommandRequest`: `ok` with a `result`, or not `ok` with an `error`."""

    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None

    def encode(self) -> bytes:
        return _dump_json(
            {"protocol": PROTOCOL_VERSION, "id": self.id, "ok": self.ok, "result": self.result, "error": self.error}
        )

    @classmethod
    def decode(cls, payload: bytes | str) -> CommandResponse:
        what = "command response"
        data = _load_json(payload, what)
        cid, ok = data.get("id"), data.get("ok")
        if not isinstance(cid, str) or not isinstance(ok, bool):
            raise ProtocolError(f"{what}: needs 'id' (string) and 'ok' (bool)")
        result = data.get("result")
        if result is not None and not isinstance(result, dict):
            raise ProtocolError(f"{what}: 'result' must be an object")
        return cls(cid, ok, result, _opt_str(data, "error", what))


@dataclass(frozen=True)
class TelemetryBatch:
    """One message on `telemetry`: msgpack `{protocol, device_id, records: [record, ...]}`.

    Each record is a map (see `modelfleet.agent.telemetry` and the protocol doc)
    with a per-device increasing `seq`; delivery is at least once, so a consumer
    drops a `seq` it has already seen.
    """

    device_id: str
    records: list[dict[str, Any]]

    def encode(self) -> bytes:
        import msgpack

        return bytes(
            msgpack.packb(
                {"protocol": PROTOCOL_VERSION, "device_id": self.device_id, "records": self.records},
                use_bin_type=True,
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> TelemetryBatch:
        import msgpack

        try:
            data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types for bad bytes
            raise ProtocolError(f"telemetry: not valid msgpack ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"telemetry: expected a protocol {PROTOCOL_VERSION} map")
        device_id, records = data.get("device_id"), data.get("records")
        if not isinstance(device_id, str) or not isinstance(records, list):
            raise ProtocolError("telemetry: needs 'device_id' (string) and 'records' (list)")
        return cls(device_id, records)
