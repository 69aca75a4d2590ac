"""The twin protocol's messages: round trips, cheap import, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelfleet.agent.errors import ProtocolError
from modelfleet.agent.modelref import ModelVersionRef
from modelfleet.agent.protocol import (
    ActiveModel,
    CommandRequest,
    CommandResponse,
    DesiredState,
    Presence,
    ReportedState,
    TelemetryBatch,
    Topics,
    device_of,
    fleet_topic,
)

REF = ModelVersionRef(name="digits", version=2, url="http://127.0.0.1:1/v1/artifacts/x", sha256="a" * 64, size=10)


def test_topics_are_per_device_and_parse_back() -> None:
    t = Topics("dev-1")
    assert t.desired == "modelfleet/v1/dev-1/desired"
    assert device_of(t.telemetry) == ("dev-1", "telemetry")
    assert fleet_topic("reported") == "modelfleet/v1/+/reported"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "a b", "-x"])
def test_invalid_device_id_is_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(ProtocolError, match=r"device id .* is invalid"):
        Topics(bad)


@pytest.mark.parametrize(("bad", "named"), [("site/dev", "'/'"), ("dev+1", "'\\+'"), ("dev#", "'#'")])
def test_device_id_with_a_topic_wildcard_names_it(bad: str, named: str) -> None:
    with pytest.raises(ProtocolError, match=rf"is invalid \({named}: MQTT topic separator or wildcard\)"):
        Topics(bad)


@pytest.mark.parametrize("reserved", ["modelfleet-controller", "modelfleet-controller-1a2b", "ModelFleet-Controller"])
def test_device_id_of_the_fleet_controller_is_reserved(reserved: str) -> None:
    with pytest.raises(ProtocolError, match=rf"device id '{reserved}' is reserved: ids starting with 'modelfleet-controller'"):
        Topics(reserved)
    assert Topics("modelfleet-device-1").device_id == "modelfleet-device-1"


def test_foreign_topic_is_refused() -> None:
    with pytest.raises(ProtocolError, match="is not under"):
        device_of("other/dev/desired")


def test_desired_round_trip() -> None:
    d = DesiredState(version=3, model=REF)
    back = DesiredState.decode(d.encode())
    assert back.version == 3 and back.model == REF


def test_desired_state_with_no_model_round_trips_as_null() -> None:
    d = DesiredState(version=4, model=None)
    assert json.loads(d.encode())["model"] is None
    back = DesiredState.decode(d.encode())
    assert back.version == 4 and back.model is None


def test_desired_state_documents_from_before_no_model_decode_as_before() -> None:
    old = {"protocol": 1, "$version": 3, "issued_at": 12.5, "model": REF.to_dict()}
    assert DesiredState.decode(json.dumps(old)) == DesiredState(3, REF, issued_at=12.5)
    assert DesiredState(3, REF, issued_at=12.5).to_dict() == old


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{nope", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"protocol": 2, "$version": 1}', "protocol 2 is not supported"),
        (b'{"$version": 0, "model": {}}', "'\\$version' must be an integer >= 1"),
        (b'{"$version": 1}', "missing field 'model'"),
        (b'{"$version": 1, "model": {"name": "x"}}', "missing field 'version'"),
        (b'{"$version": 1, "model": 5}', "expected an object"),
    ],
)
def test_bad_desired_state_names_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        DesiredState.decode(payload)


def test_reported_round_trip_and_bad_status() -> None:
    r = ReportedState("dev-1", 4, "failed", active=ActiveModel.of(REF), stage="verify", reason="sha256 mismatch")
    back = ReportedState.decode(r.encode())
    assert back.status == "failed" and back.active == ActiveModel.of(REF) and back.reason == "sha256 mismatch"
    with pytest.raises(ProtocolError, match="'status' must be one of"):
        ReportedState.decode(b'{"device_id": "d", "status": "done"}')


def test_presence_commands_and_telemetry_round_trip() -> None:
    assert Presence.decode(Presence("d", True, ts=1.0).encode()).online is True
    assert Presence.decode(Presence("d", True, tags={"site": "a"}).encode()).tags == {"site": "a"}
    with pytest.raises(ProtocolError, match="'tags' must be an object"):
        Presence.decode(b'{"device_id": "d", "online": true, "tags": [1]}')
    req = CommandRequest.decode(CommandRequest("c1", "get-state").encode())
    assert req.name == "get-state" and req.args == {}
    resp = CommandResponse.decode(CommandResponse("c1", False, error="boom").encode())
    assert resp.error == "boom"
    batch = TelemetryBatch("d", [{"seq": 1, "requests": 5}])
    assert TelemetryBatch.decode(batch.encode()).records == [{"seq": 1, "requests": 5}]
    with pytest.raises(ProtocolError, match=r"not valid msgpack|expected a protocol"):
        TelemetryBatch.decode(b"\xc1\xc1")
    with pytest.raises(ProtocolError, match="'id' must be a non-empty string"):
        CommandRequest.decode(b'{"name": "get-state"}')


def test_command_carries_issued_at_and_its_age() -> None:
    sent = CommandRequest.decode(CommandRequest("c1", "get-state").encode())
    assert sent.issued_at > 0 and sent.age() is not None and 0 <= sent.age() < 60  # type: ignore[operator]
    old = CommandRequest.decode(CommandRequest("c2", "rollback", issued_at=1000.0).encode())
    assert old.age(now=1600.0) == 600.0
    # a controller from before `issued_at`: no age, so never expired
    legacy = CommandRequest.decode(b'{"protocol": 1, "id": "c3", "name": "get-state", "args": {}}')
    assert legacy.issued_at == 0.0 and legacy.age() is None
    with pytest.raises(ProtocolError, match="'issued_at' must be a number"):
        CommandRequest.decode(b'{"id": "c4", "name": "get-state", "issued_at": "yesterday"}')


def test_protocol_import_pulls_no_heavy_modules() -> None:
    code = (
        "import sys, modelfleet.agent.protocol as p;"
        "p.DesiredState.decode(p.DesiredState(1, p.ModelVersionRef('m', 1, 'http://x', 'a'*64, 1)).encode());"
        "bad = [m for m in ('paho', 'onnxruntime', 'numpy', 'msgpack', 'modelfleet.scoring') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"device_id": "d", "status": "applied", "attempt": "x"}', "'attempt' must be an integer"),
        (b'{"device_id": "d", "status": "applied", "updated_at": "soon"}', "'updated_at' must be a number"),
        (b'{"device_id": "d", "status": "applied", "active": {"name": 1}}', "active: needs 'name'"),
        (b'{"device_id": "d", "status": "applied", "$version": -1}', "'\\$version' must be an integer >= 1"),
    ],
)
def test_bad_reported_state_from_a_device_is_a_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ReportedState.decode(payload)


def test_bad_presence_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="'ts' must be a number"):
        Presence.decode(b'{"device_id": "d", "online": true, "ts": "now"}')


@pytest.mark.parametrize(
    ("payload", "version"),
    [
        (b'{"$version": 9, "model": {"name": "x"}}', 9),
        (b"not json", None),
        (b"[9]", None),
        (b'{"$version": true}', None),
        (b'{"$version": 0}', None),
        (b'{"$version": "9"}', None),
    ],
)
def test_version_of_an_undecodable_desired_state(payload: bytes, version: int | None) -> None:
    assert DesiredState.version_of(payload) == version


@pytest.mark.parametrize(
    ("payload", "cid"),
    [
        (b'{"protocol": 1, "id": "c-7", "name": "get-state", "args": []}', "c-7"),
        (b"not json", ""),
        (b'["c-7"]', ""),
        (b'{"id": 7, "name": "get-state"}', ""),
    ],
)
def test_id_of_an_undecodable_command(payload: bytes, cid: str) -> None:
    with pytest.raises(ProtocolError):
        CommandRequest.decode(payload)
    assert CommandRequest.id_of(payload) == cid


@pytest.mark.parametrize("value", ['""', "[]", "{}", "false"])
def test_a_number_field_refuses_every_non_number(value: str) -> None:
    with pytest.raises(ProtocolError, match="presence: 'ts' must be a number"):
        Presence.decode(f'{{"protocol": 1, "device_id": "d", "online": true, "ts": {value}}}')


def _desired_with(**fields: object) -> bytes:
    model = {**REF.to_dict(), "format": "tar", **fields}
    return json.dumps({"$version": 1, "model": model}).encode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # the signature covers the artifact only: code from anywhere else on the device must not run
        ({"entry_script": "/tmp/evil.py"}, r"'entry_script' must be a relative path inside the model folder, got '/tmp/evil.py'"),
        ({"entry_script": "src/../../evil.py"}, r"'entry_script' must be a relative path inside the model folder"),
        ({"entry_script": ""}, r"'entry_script' must be a relative path inside the model folder"),
        ({"entry_script": 5}, r"'entry_script' must be a string"),
        ({"filename": 5}, r"'filename' must be a string"),
        ({"framework": None}, r"'framework' must be a string"),
        ({"signature": 5}, r"'signature' must be a string"),
        ({"key_id": ["k"]}, r"'key_id' must be a string"),
    ],
)
def test_bad_model_ref_fields_are_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        DesiredState.decode(_desired_with(**fields))


def test_an_entry_script_in_a_subfolder_is_accepted() -> None:
    assert DesiredState.decode(_desired_with(entry_script="src/score.py")).model.entry_script == "src/score.py"
